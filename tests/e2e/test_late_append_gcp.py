"""Issue 16, appends exactly once by construction: "An AppendRows held past the client's
timeout, then committed". The Storage Write proxy answers the table's first append only
after the subscriber's deadline has passed, and still hands it to the emulator. On the
default stream (at least once) that late append lands after the retry wrote the rows
again: duplicates marked done. On a PENDING stream it lands in a stream nobody commits.
"""

from __future__ import annotations

import time

import pytest

from tests.support.faults.google import _google_outcome, _post_ok, _wait_markers, google_stack
from tests.support.faults.harness import rows_body
from tests.support.faults.outcome import Outcome
from tests.support.processes import wait_until

pytestmark = [pytest.mark.emulator]

WRITE_TIMEOUT_SECONDS = 2.0  # the subscriber's Storage Write deadline
HOLD_SECONDS = 8.0  # the held append reaches the emulator this long after it was sent


def scenario_late_append(tmp) -> Outcome:
    out = Outcome("AppendRows held past the client's timeout, then committed",
                  f"the first append of the table answered after {HOLD_SECONDS:g} s, the client waits {WRITE_TIMEOUT_SECONDS:g} s")  # fmt: skip
    table = "late_append"
    with google_stack(tmp, BIGQUERY_WRITE_TIMEOUT_SECONDS=str(WRITE_TIMEOUT_SECONDS)) as g:
        g.storage_write.hold_appends(table, seconds=HOLD_SECONDS)
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 5, "held"))
        _post_ok(g.p, rows_body(table, 10, 5, "next"))
        expected = {"held": 5, "next": 5}
        _wait_markers(g, [table], expected)
        # the held append reaches the emulator only now, after the retry completed
        wait_until(lambda: g.storage_write.held >= 1 and not g.storage_write.holding, timeout=60, interval=0.2,
                   what="the held append to be forwarded")  # fmt: skip
        time.sleep(0.5)  # its answer goes nowhere; what it wrote is visible (or not) by now
        out.data["held"] = g.storage_write.held
        return _google_outcome(out, g, [table], expected)


def test_an_append_held_past_the_client_timeout_then_committed_adds_no_rows(tmp_path):
    o = scenario_late_append(tmp_path)
    assert o.data["held"] == 1, "the fault was never served"
    # nothing healthy dead-lettered
    assert o.data["dead_letter_store"] == [], o.data["dead_letter_store"]
    assert o.data["dead_letter_topic"] == [], o.data["dead_letter_topic"]
    assert o.data["gate_dead_lettered"] == []
    # every accepted row present exactly once
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # per-table order: no message acked while an earlier one of its table was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]
