"""Google-behaviour scenarios with more than one subscriber replica (emulators + fault layer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.faults.google import GoogleStack, _google_outcome, _post_ok, _wait_markers, google_stack
from tests.support.faults.harness import rows_body
from tests.support.faults.outcome import Outcome, timed
from tests.support.processes import ROOT, free_port, wait_until


def start_replica(g: GoogleStack, name: str) -> subprocess.Popen:
    """Another subscriber process on the same subscription and warehouse (its own admin port)."""
    port = free_port()
    log = open(g.p.log_dir / f"{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "app", "subscriber"], cwd=ROOT,
                            env={**g.p.env, "SUBSCRIBER_PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT)
    g.p.procs[name] = proc  # stopped with the others
    wait_until(lambda: proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
               timeout=60, what=f"{name} to start")
    return proc


@timed
def scenario_no_key_affinity(tmp: Path, slow_seconds: float = 4.0) -> Outcome:
    """Two replicas; Pub/Sub hands a key's later messages to a Pull of the replica that does
    not hold the earlier one (no key affinity, as Google allows for unary Pull), while
    that earlier one's apply is slow."""
    out = Outcome("Pub/Sub without key affinity",
                  "two subscriber replicas; a later message of a key served to another replica's Pull "
                  f"while the first one's apply takes {slow_seconds:g} s")
    table = "affinity_t"
    with google_stack(tmp, key_affinity=False) as g:
        g.p.start("subscriber")
        start_replica(g, "subscriber-2")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 100, 2, "base"))  # the table exists before the race
        _wait_markers(g, [table], {"base": 2})
        delivered = g.gate.deliveries
        # the next call naming the table (of whichever replica gets `first`) is slow
        g.rest.add(None, {"jobs.insert", "jobs.query", "tables.get", "tables.insert"}, times=1, delay=slow_seconds,
                   target=rf"\b{table}\b")
        _post_ok(g.p, rows_body(table, 0, 5, "first"))
        wait_until(lambda: g.gate.deliveries > delivered, timeout=30, interval=0.05, what="`first` to be leased")
        _post_ok(g.p, rows_body(table, 10, 5, "second"))
        _post_ok(g.p, rows_body(table, 20, 5, "third"))
        expected = {"base": 2, "first": 5, "second": 5, "third": 5}
        _wait_markers(g, [table], expected)
        out.data.update(subscribers=sorted(g.gate.subscribers), served_across=g.gate.served_across,
                        refused_acks=g.gate.refused_acks)
        return _google_outcome(out, g, [table], expected)
