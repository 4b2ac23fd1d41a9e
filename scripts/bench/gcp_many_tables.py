"""Bench section `gcp_tables`: a many-table stream on the Google path against one table.

The same rows twice, each posted as a backlog and drained by a fresh stack (pstest ->
subscriber -> bqemulator through the fault layer, nothing armed: it counts): once spread
over 100 tables with 10 tables per request, once all to one table. Reported: the drain
ratio (target <= 4x; the clock stops at the subscriber's last ack), messages and tables
per apply, API calls (REST, AppendRows requests and the other Storage Write RPCs) and
bytes per 10,000 activities, and Storage Write connections open at peak.
Scenario: `tests/support/faults/google_many_tables.py` (also the e2e test's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

MIN_BILLED_PER_QUERY = 10 * 1024 * 1024  # on-demand minimum per query job (https://cloud.google.com/bigquery/pricing#on_demand_pricing)


def _figures(o: Any) -> dict[str, Any]:
    d = o.data
    per = 10_000 / max(1, o.accepted)
    # AppendRows requests count one by one; the other Storage Write RPCs (stream create,
    # finalize, commit) are calls of their own
    unary_writes = sum(n for m, n in d["write_rpcs"].items() if m != "AppendRows")
    calls = sum(d["rest_calls"].values()) + d["append_requests"] + unary_writes
    return {
        "rows": o.accepted, "landed": o.landed, "lost": o.lost, "duplicated": o.duplicated,
        "messages": d["messages"], "seconds": d["drain_seconds"], "rows_per_s": o.accepted / max(1e-9, d["drain_seconds"]),
        "messages_per_apply": d["messages_per_apply"], "tables_per_apply": d["tables_per_apply"],
        "calls_per_10k": calls * per, "rest_calls": d["rest_calls"], "append_requests": d["append_requests"],
        "write_rpcs": d["write_rpcs"], "write_rpcs_per_10k": unary_writes * per,
        "query_jobs_per_10k": d["query_jobs"] * per, "bytes_processed_per_10k": d["bytes_processed"] * per,
        "min_bytes_billed_per_10k": d["billable_jobs"] * MIN_BILLED_PER_QUERY * per,
        "connections_opened": d["connections_opened"], "connections_peak": d["connections_peak"],
        "notes": o.notes,
    }  # fmt: skip


def measure(tmp: Path, rows: int, tables: int, log: Callable[[str], None]) -> dict[str, Any]:
    from tests.support.faults.google_many_tables import scenario_many_tables

    out: dict[str, Any] = {}
    for name, n_tables, per_request in (("many", tables, 10), ("one", 1, 1)):
        with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
            o = scenario_many_tables(Path(run_dir), tables=n_tables, rows=rows, tables_per_request=per_request,
                                     rows_per_request=100, timeout=900)  # fmt: skip
        out[name] = _figures(o)
        f = out[name]
        log(f"  {n_tables} table(s): {f['rows']} rows in {f['seconds']:.1f} s, {f['messages_per_apply']:.1f} msgs/apply, "
            f"{f['calls_per_10k']:,.0f} calls/10k ({f['write_rpcs_per_10k']:,.0f} stream RPCs), peak {f['connections_peak']} connections; lost {f['lost']}, dup {f['duplicated']}")
    out["ratio"] = out["many"]["seconds"] / max(1e-9, out["one"]["seconds"])
    log(f"  many tables / one table: {out['ratio']:.2f}x")
    return out
