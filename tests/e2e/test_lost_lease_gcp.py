"""Issue 16, fencing between replicas: "Two subscriber replicas with a lease that expires
during an apply". Replica 1 is frozen (SIGSTOP, as a long GC pause or a preempted VM)
with its append on the wire; its lease runs out and replica 2 applies the message. Then
replica 1 wakes up and goes on with its apply: it must neither commit its rows nor write
`done`, nor clean up replica 2's rows.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.faults.google import _google_outcome, _post_ok, _wait_markers, google_stack
from tests.support.faults.harness import rows_body
from tests.support.faults.outcome import Outcome
from tests.support.faults.replicas import start_replica
from tests.support.processes import wait_until

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

LEASE_SECONDS = 2.0  # the first delivery's lease
HOLD_SECONDS = 3.0  # replica 1's append is answered this late
WRITE_TIMEOUT_SECONDS = 300.0  # replica 1's deadline outlasts its freeze: it goes on to its commit


def scenario_lost_lease(tmp) -> Outcome:
    out = Outcome("Two replicas, a lease that expires during an apply",
                  f"replica 1 frozen mid-append; its lease ({LEASE_SECONDS:g} s) runs out and replica 2 applies; then replica 1 resumes")  # fmt: skip
    table = "lease_fence"
    with google_stack(tmp, expire_leases_after=LEASE_SECONDS, expiring_leases=1,
                      BIGQUERY_WRITE_TIMEOUT_SECONDS=str(WRITE_TIMEOUT_SECONDS)) as g:
        g.storage_write.hold_appends(table, seconds=HOLD_SECONDS)
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 5, "first"))
        wait_until(lambda: g.storage_write.holding == 1, timeout=60, interval=0.05, what="replica 1's append to be on the wire")
        first = g.p.procs["subscriber"]
        os.kill(first.pid, signal.SIGSTOP)
        try:
            start_replica(g, "subscriber-2")
            _wait_markers(g, [table], {"first": 5})  # replica 2, after the lease ran out
            wait_until(lambda: g.storage_write.held >= 1, timeout=30, interval=0.1, what="the held append to reach the emulator")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        # replica 1 finishes its apply (and acks late, or fails and retries, then acks)
        wait_until(lambda: g.gate.late_acks + g.gate.refused_acks >= 1, timeout=90, interval=0.2,
                   what="replica 1 to finish with the message")  # fmt: skip
        _post_ok(g.p, rows_body(table, 10, 5, "next"))
        expected = {"first": 5, "next": 5}
        _wait_markers(g, [table], expected)
        time.sleep(1)  # anything replica 1 still had in flight has landed by now
        out.data.update(leases_expired=g.gate.expired, subscribers=sorted(g.gate.subscribers))
        return _google_outcome(out, g, [table], expected)


def test_a_replica_whose_lease_ran_out_mid_apply_neither_commits_nor_marks_done(tmp_path):
    o = scenario_lost_lease(tmp_path)
    assert o.data["leases_expired"] >= 1 and len(o.data["subscribers"]) >= 2, o.data
    # nothing healthy dead-lettered
    assert o.data["dead_letter_store"] == [], o.data["dead_letter_store"]
    assert o.data["dead_letter_topic"] == [], o.data["dead_letter_topic"]
    assert o.data["gate_dead_lettered"] == []
    # every accepted row present exactly once
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # per-table order: no message acked while an earlier one of its table was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]
