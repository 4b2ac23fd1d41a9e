"""The many-tables drain: the same rows as one table, or spread over many tables.

A database has many tables and one request usually carries activity for several of
them; each (request, table) chunk is its own message. This workload publishes
`requests` requests of `per_request` one-row activities, each request spread over
`tables_per_request` tables out of `tables` (or all to one table), as the API would
encode them, then times a subscriber draining the backlog and samples its peak RSS.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from scripts.bench.workload import publish_bodies

COLUMNS = [("user_id", "integer"), ("event_type_id", "integer"), ("detail", "string"), ("occured_at", "datetime")]


def bodies(requests: int, per_request: int, tables: int, tables_per_request: int) -> Iterator[dict[str, Any]]:
    """Request bodies; with `tables == 1` every activity goes to one table."""
    row = 0
    for r in range(requests):
        first = (r * tables_per_request) % tables
        acts = []
        for i in range(per_request):
            table = (first + i % tables_per_request) % tables if tables > 1 else 0
            acts.append({
                "operation": "insert", "table": f"bench_t{table:05d}",
                "col_names": [n for n, _ in COLUMNS], "col_types": [t for _, t in COLUMNS],
                "col_values": [row, row % 50, "logged in", f"2021-03-{1 + row % 28:02d} 06:12:44"],
            })
            row += 1
        yield {"user_activities": acts}


def prefill(broker, requests: int, per_request: int, tables: int, tables_per_request: int) -> dict[str, int]:
    """Publish the workload through `broker.publish`; returns rows and messages."""
    rows = [0]

    def count(activities) -> None:
        rows[0] += len(activities)

    messages = publish_bodies(broker, bodies(requests, per_request, tables, tables_per_request), count)
    return {"rows": rows[0], "messages": messages}


def backlog(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def drain(tmp: Path, name: str, requests: int, per_request: int, tables: int, tables_per_request: int,
          log=print) -> dict[str, Any]:
    """Pre-fill a local broker, then time a subscriber process draining it."""
    from app.broker import make_broker
    from app.settings import Settings
    from scripts.bench import harness

    data = tmp / name / "data"
    settings = Settings(data_dir=data)
    broker = make_broker(settings)
    started = time.perf_counter()
    filled = prefill(broker, requests, per_request, tables, tables_per_request)
    broker.close()
    log(f"  {name}: pre-filled {filled['rows']:,} rows as {filled['messages']:,} messages over {tables:,} table(s) "
        f"in {time.perf_counter() - started:.1f}s")
    sub = harness.start_subscriber(harness.base_env(data), tmp / name / "logs", healthy=False)
    try:
        with harness.RssSampler(sub.proc.pid) as rss:
            while backlog(settings.broker_file) > 0:
                if sub.proc.poll() is not None:
                    raise RuntimeError(f"subscriber exited; see {sub.log_path}")
                time.sleep(0.05)
            sub.wait_healthy()
        # It starts pulling before it answers /healthz: the drain is timed by its own log,
        # from "subscriber started" to the last "applied" line (millisecond stamps).
        elapsed = max(drain_seconds(sub.log_path), 1e-3)
        with urllib.request.urlopen(sub.url + "/stats", timeout=30) as answer:
            stats = json.loads(answer.read())
    finally:
        sub.stop()
    if stats["rows_inserted"] != filled["rows"] or stats["dead_lettered"]:
        raise RuntimeError(f"{name}: inserted {stats['rows_inserted']} of {filled['rows']}, "
                           f"dead letters {stats['dead_lettered']}")
    log(f"  {name}: drained in {elapsed:.2f}s ({filled['rows'] / elapsed:,.0f} rows/s), peak RSS {rss.peak_mb:.0f} MB")
    return {"rows": filled["rows"], "messages": filled["messages"], "tables": tables, "seconds": elapsed,
            "rows_per_s": filled["rows"] / elapsed, "sub_peak_rss_mb": rss.peak_mb}


def drain_seconds(log_path: Path) -> float:
    """From the subscriber's "subscriber started" line to its last "applied" line."""
    started = last = None
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("msg") == "subscriber started":
            started = entry["ts"]
        elif entry.get("msg") == "applied":
            last = entry["ts"]
    if started is None or last is None:
        raise RuntimeError(f"no start or apply in {log_path}")
    stamp = lambda ts: datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()  # noqa: E731
    return stamp(last) - stamp(started)


def bench_many_tables(tmp: Path, results: dict[str, Any], requests: int = 500, per_request: int = 100,
                      tables: int = 1000, tables_per_request: int = 100, wide_tables: int = 0, log=print) -> None:
    """One table against `tables` tables, the same rows (issue 20's shape by default); with
    `wide_tables`, the same rows once more over that many tables (its peak RSS is a target)."""
    one = drain(tmp, "one_table", requests, per_request, 1, 1, log)
    many = drain(tmp, "many_tables", requests, per_request, tables, tables_per_request, log)
    results["many_tables"] = {"one_table": one, "many_tables": many, "slowdown": many["seconds"] / one["seconds"]}
    log(f"  many tables / one table: {many['seconds'] / one['seconds']:.2f}x the time")
    if wide_tables:
        wide = drain(tmp, "wide_tables", requests, per_request, wide_tables, tables_per_request, log)
        results["many_tables"]["wide_tables"] = wide


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--tables-per-request", type=int, default=100)
    parser.add_argument("--wide-tables", type=int, default=0, help="also drain the rows over this many tables")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, Any] = {}
        bench_many_tables(Path(tmp), out, args.requests, args.per_request, args.tables, args.tables_per_request,
                          args.wide_tables)
        print(json.dumps(out, indent=2))
