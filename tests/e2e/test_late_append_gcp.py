"""Issue 16, appends exactly once by construction: "An AppendRows held past the client's
timeout, then committed". The Storage Write proxy answers the table's first append only
after the subscriber's deadline has passed, and still hands it to the emulator. On the
default stream (at least once) that late append lands after the retry wrote the rows
again: duplicates marked done. On a PENDING stream it lands in a stream nobody commits.

The same for the commit itself: every BatchCommitWriteStreams of the table for a few
seconds is answered only after the deadline, and still applied. Unsettled, the retry's
clean-up ran before it landed, and its rows came in next to the retry's; settled (the
stream asked, committed again: `StorageWriter.commit`), they land once.
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
COMMIT_WINDOW_SECONDS = 5.0  # commits sent this long after the first post are held


def scenario_late_append(tmp, held: str = "append") -> Outcome:
    out = Outcome(f"{held} held past the client's timeout, then applied",
                  f"the table's {held} answered after {HOLD_SECONDS:g} s, the client waits {WRITE_TIMEOUT_SECONDS:g} s")  # fmt: skip
    table = f"late_{held}"
    with google_stack(tmp, BIGQUERY_WRITE_TIMEOUT_SECONDS=str(WRITE_TIMEOUT_SECONDS)) as g:
        faults = g.storage_write if held == "append" else g.storage_write.commits
        g.p.start("subscriber")
        g.p.start("api")
        if held == "append":
            g.storage_write.hold_appends(table, seconds=HOLD_SECONDS)
        else:  # every commit of the next seconds, retries included
            g.storage_write.commits.hold(table, seconds=HOLD_SECONDS, window=COMMIT_WINDOW_SECONDS)
        _post_ok(g.p, rows_body(table, 0, 5, "held"))
        _post_ok(g.p, rows_body(table, 10, 5, "next"))
        expected = {"held": 5, "next": 5}
        _wait_markers(g, [table], expected)
        # the held append reaches the emulator only now, after the retry completed
        wait_until(lambda: faults.held >= 1 and not faults.holding, timeout=60, interval=0.2,
                   what=f"the held {held} to be forwarded")  # fmt: skip
        time.sleep(0.5)  # its answer goes nowhere; what it wrote is visible (or not) by now
        out.data["held"] = faults.held
        return _google_outcome(out, g, [table], expected)


@pytest.mark.parametrize("held", ["append", "commit"])
def test_an_append_or_commit_held_past_the_client_timeout_then_applied_adds_no_rows(tmp_path, held):
    o = scenario_late_append(tmp_path, held)
    assert o.data["held"] >= 1, "the fault was never served"
    # nothing healthy dead-lettered
    assert o.data["dead_letter_store"] == [], o.data["dead_letter_store"]
    assert o.data["dead_letter_topic"] == [], o.data["dead_letter_topic"]
    assert o.data["gate_dead_lettered"] == []
    # every accepted row present exactly once
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # per-table order: no message acked while an earlier one of its table was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]
