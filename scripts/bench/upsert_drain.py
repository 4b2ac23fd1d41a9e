"""The upsert drain on DuckDB: 100,000 upserts over 10,000 keys against the insert drain
of the same rows, in the same run (issue 17's target: >= 0.5x the insert drain's rate).

Both backlogs are published as the API would encode them (500 activities per request,
one table), then a subscriber process drains each; the time is read from its own log,
from "subscriber started" to the last "applied" line, as for the many-tables drain.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from scripts.bench.many_tables import backlog, drain_seconds
from scripts.bench.workload import publish_bodies

COLUMNS = [("user_id", "integer"), ("email", "string"), ("plan", "string"), ("updated_at", "datetime")]


def bodies(operation: str, rows: int, keys: int, per_request: int, seed: int = 17) -> Iterator[dict[str, Any]]:
    """`rows` activities of random keys (the same rows for either operation)."""
    rng = random.Random(seed)
    for start in range(0, rows, per_request):
        acts = []
        for i in range(start, min(rows, start + per_request)):
            k = rng.randrange(keys)
            act = {"operation": operation, "table": "bench_current", "col_names": [n for n, _ in COLUMNS],
                   "col_types": [t for _, t in COLUMNS],
                   "col_values": [k, f"user{k}@example.com", ("free", "pro", "team")[i % 3],
                                  f"2026-01-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:00"]}
            if operation == "upsert":
                act["key"] = ["user_id"]
            acts.append(act)
        yield {"user_activities": acts}


def drain(tmp: Path, operation: str, rows: int, keys: int, per_request: int, log=print) -> dict[str, Any]:
    from app.broker import make_broker
    from app.settings import Settings
    from scripts.bench import harness

    data = tmp / f"{operation}_drain" / "data"
    settings = Settings(data_dir=data)
    broker = make_broker(settings)
    messages = publish_bodies(broker, bodies(operation, rows, keys, per_request))
    broker.close()
    sub = harness.start_subscriber(harness.base_env(data), tmp / f"{operation}_drain" / "logs", healthy=False)
    try:
        with harness.RssSampler(sub.proc.pid) as rss:
            while backlog(settings.broker_file) > 0:
                if sub.proc.poll() is not None:
                    raise RuntimeError(f"subscriber exited; see {sub.log_path}")
                time.sleep(0.05)
            sub.wait_healthy()
        elapsed = max(drain_seconds(sub.log_path), 1e-3)
        with urllib.request.urlopen(sub.url + "/stats", timeout=30) as answer:
            stats = json.loads(answer.read())
        ask = urllib.request.Request(sub.url + "/query", data=json.dumps({"sql": "SELECT count(*) FROM bench_current"}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=30) as answer:
            table_rows = json.loads(answer.read())["rows"][0][0]
    finally:
        sub.stop()
    written = stats["rows_upserted"] if operation == "upsert" else stats["rows_inserted"]
    if written != rows or stats["dead_lettered"]:
        raise RuntimeError(f"{operation}: wrote {written} of {rows} rows, dead letters {stats['dead_lettered']}")
    log(f"  {operation}: {rows:,} rows over {keys:,} keys drained in {elapsed:.2f}s ({rows / elapsed:,.0f} rows/s), "
        f"peak RSS {rss.peak_mb:.0f} MB")
    return {"rows": rows, "messages": messages, "seconds": elapsed, "rows_per_s": rows / elapsed,
            "sub_peak_rss_mb": rss.peak_mb, "table": table_rows}


def bench_upsert(tmp: Path, results: dict[str, Any], rows: int = 100_000, keys: int = 10_000, per_request: int = 500,
                 rounds: int = 3, log=print) -> None:
    """Alternating insert and upsert drains; the median round of each (the machine is noisy)."""
    runs: dict[str, list[dict[str, Any]]] = {"insert": [], "upsert": []}
    for r in range(rounds):
        for operation in runs:
            runs[operation].append(drain(tmp / f"round{r}", operation, rows, keys, per_request, log))
    median = {op: sorted(found, key=lambda d: d["seconds"])[len(found) // 2] for op, found in runs.items()}
    ratios = sorted(u["rows_per_s"] / i["rows_per_s"] for i, u in zip(runs["insert"], runs["upsert"]))
    results["upsert"] = {**median, "keys": keys, "rounds": rounds,
                         "ratio": median["upsert"]["rows_per_s"] / median["insert"]["rows_per_s"],
                         "ratio_range": [ratios[0], ratios[-1]]}
    log(f"  upsert drain / insert drain: {results['upsert']['ratio']:.2f}x the rate "
        f"(medians of {rounds}; per round {ratios[0]:.2f}-{ratios[-1]:.2f}x)")


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, Any] = {}
        bench_upsert(Path(tmp), out, args.rows, args.keys)
        print(json.dumps(out, indent=2))
