"""`make bench`: measure the pipeline on this machine, with baselines from the same run.

Prints a table, writes docs/benchmarks.md and docs/benchmarks.png. Every figure is shown
next to baselines measured in the same run (as a ratio), because the machine is shared
and absolute numbers move. Load generators are separate processes (wrk; a paced asyncio
client for the end-to-end test), each bounded in time.

    .venv/bin/python -m scripts.bench            # full run (~5 minutes), from the repo root
    .venv/bin/python -m scripts.bench --quick    # smoke version (~2 minutes)
    options: --only api,keys,drain,many_tables,upsert,e2e,bigquery,gcp,gcp_tables,gcp_upsert  --backlog N  --seconds S  --wide-tables N  --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from scripts.bench.evaluate import evaluate
from scripts.bench.harness import ROOT
from scripts.bench.many_tables import bench_many_tables
from scripts.bench.report import print_table, write_report
from scripts.bench.run import (
    bench_api, bench_bigquery, bench_drain, bench_e2e, bench_gcp, bench_gcp_many_tables, bench_keys, e2e_rate, log,
)
from scripts.bench.gcp_upsert import bench_gcp_upsert
from scripts.bench.upsert_drain import bench_upsert


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~2 minute smoke run (shorter loads, 200k backlog)")
    p.add_argument("--only", default="api,keys,drain,many_tables,upsert,e2e,bigquery,gcp,gcp_tables,gcp_upsert", help="comma-separated sections")
    p.add_argument("--seconds", type=float, help="duration of each load (default 8, quick 3)")
    p.add_argument("--backlog", type=int, help="activities in the drain backlog (default 1,000,000, quick 200,000)")
    p.add_argument("--wide-tables", type=int, help="many_tables: also drain its rows over this many tables (default 10,000, quick 0)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data)")
    p.add_argument("--from-json", help="re-render the report from raw results saved with --json (no measuring)")
    args = p.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        rows = evaluate({k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v and k not in ("bigquery", "gcp", "gcp_tables", "gcp_upsert"))})
        out = Path(args.out)
        write_report(results, rows, results.get("_meta", {"quick": False, "when": "?", "machine": "?"}), out, out.with_suffix(".png"))
        print_table(rows)
        return 0
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    backlog = args.backlog or (200_000 if args.quick else 1_000_000)
    wide_tables = args.wide_tables if args.wide_tables is not None else (0 if args.quick else 10_000)
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    results: dict[str, Any] = {}
    started = time.monotonic()
    failures = []
    sections = [
        ("api", lambda: bench_api(tmp, seconds, results, 1 if args.quick else 2)),
        ("keys", lambda: bench_keys(results, 5 if args.quick else 15)),
        ("drain", lambda: bench_drain(tmp, backlog, 5_000 if args.quick else 20_000, results)),
        ("many_tables", lambda: bench_many_tables(tmp, results, requests=100 if args.quick else 500, log=log,
                                                  wide_tables=wide_tables)),
        ("upsert", lambda: bench_upsert(tmp, results, rows=20_000 if args.quick else 100_000,
                                        keys=2_000 if args.quick else 10_000, rounds=1 if args.quick else 3, log=log)),
        ("e2e", lambda: bench_e2e(tmp, seconds * 2, e2e_rate(results), results)),
        ("bigquery", lambda: bench_bigquery(tmp, 10_000, 50 if args.quick else 200, results)),
        ("gcp", lambda: bench_gcp(tmp, 2_000 if args.quick else 10_000, 30 if args.quick else 60, 30 if args.quick else 100, results)),
        ("gcp_tables", lambda: bench_gcp_many_tables(tmp, 2_000, 100, results)),
        ("gcp_upsert", lambda: bench_gcp_upsert(tmp, results, rows=2_000 if args.quick else 10_000,
                                                keys=200 if args.quick else 1_000, log=log)),
    ]
    try:
        for name, fn in sections:
            if name not in only:
                continue
            log(f"section {name}")
            try:
                fn()
            except Exception as exc:
                traceback.print_exc()
                failures.append(name)
                results.setdefault(name, {"error": f"{type(exc).__name__}: {exc}"})
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    results["total_seconds"] = round(time.monotonic() - started, 1)
    rows = evaluate({k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v and k not in ("bigquery", "gcp", "gcp_tables", "gcp_upsert"))})
    meta = {"quick": args.quick, "when": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, rows, meta, out, out.with_suffix(".png"))
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "_meta": meta}, indent=1, default=str))
    print()
    print_table(rows)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {results['total_seconds']:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
