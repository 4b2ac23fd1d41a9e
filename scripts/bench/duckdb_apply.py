"""Micro-benchmark: `DuckDBWarehouse.apply` against a raw DuckDB append of the same rows.

    .venv/bin/python -m scripts.bench.duckdb_apply [--rows 200000] [--per-apply 20] [--deletes 0] [--format v2]

Rows (integer, string, timestamp, numeric; canonical values as messages carry them) go
through `apply` in envelopes of 500, `--per-apply` envelopes per call (one transaction
each, as the subscriber hands over a pull). The ceiling, in the same run, is one
`INSERT ... SELECT` per call from a natively typed Arrow table built outside the timer.
`--deletes N` adds N single-key deletes spread over the envelopes (a delete run each).
`--format v2` hands the envelopes over as columnar runs (what v2 messages decode to),
`v1` as canonical Python activities.
Prints both rates and their ratio (medians of alternating rounds: this machine is noisy); profile it with `py-spy record -- python <this>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from app.schema.activity import Activity
from app.schema.columnar import runs_of, to_arrow
from app.settings import Settings
from app.warehouse.base import Envelope
from app.warehouse.duckdb import TYPE_MAPPER, DuckDBWarehouse

NAMES = ["id", "name", "ts", "amount"]
TYPES = ["integer", "string", "timestamp", "numeric"]
ENVELOPE = 500


def make_rows(n: int) -> list[list]:
    return [
        [i, f"user-{i % 9973}", f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{i % 60:02d}.{i % 1000000:06d}Z",
         f"{i % 100000}.{i % 1000:03d}"]
        for i in range(n)
    ]


def make_calls(rows: list[list], per_apply: int, deletes: int, columnar: bool) -> list[list[Envelope]]:
    envelopes = []
    every = max(1, len(rows) // ENVELOPE // deletes) if deletes else 0
    for k, start in enumerate(range(0, len(rows), ENVELOPE)):
        acts = [Activity("insert", "bench", NAMES, TYPES, r) for r in rows[start:start + ENVELOPE]]
        if every and k % every == 0:
            acts.append(Activity("delete", "bench", ["id"], ["integer"], [start]))
        if columnar:
            envelopes.append(Envelope(f"e{k}", "bench", runs=runs_of(acts)))
        else:
            envelopes.append(Envelope(f"e{k}", "bench", acts))
    return [envelopes[i:i + per_apply] for i in range(0, len(envelopes), per_apply)]


def bench_apply(path: Path, calls: list[list[Envelope]]) -> float:
    wh = DuckDBWarehouse(Settings(duckdb_path=path))
    wh.apply("bench", calls[0][:1])  # creates the table outside the timer
    started = time.perf_counter()
    for call in calls:
        wh.apply("bench", call if call is not calls[0] else call[1:])
    secs = time.perf_counter() - started
    wh.close()
    return secs


def bench_raw(path: Path, rows: list[list], per_apply: int) -> float:
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE bench ({', '.join(f'{n} {TYPE_MAPPER.column_type(t)}' for n, t in zip(NAMES, TYPES))})")
    step = per_apply * ENVELOPE
    tables = []
    for start in range(0, len(rows), step):
        cols = list(zip(*rows[start:start + step]))
        tables.append(pa.table({name: to_arrow(typ, list(col)) for name, typ, col in zip(NAMES, TYPES, cols)}))
    started = time.perf_counter()
    for tbl in tables:
        con.execute("BEGIN")
        con.register("stage", tbl)
        con.execute("INSERT INTO bench SELECT * FROM stage")
        con.unregister("stage")
        con.execute("COMMIT")
    secs = time.perf_counter() - started
    con.close()
    return secs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--per-apply", type=int, default=20, help="envelopes of 500 per apply call")
    p.add_argument("--deletes", type=int, default=0)
    p.add_argument("--format", choices=("v1", "v2"), default="v2", help="activities (v1) or columnar runs (v2)")
    p.add_argument("--rounds", type=int, default=3, help="alternate apply and raw runs; report medians")
    args = p.parse_args()
    rows = make_rows(args.rows)
    calls = make_calls(rows, args.per_apply, args.deletes, args.format == "v2")
    applied, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            applied.append(bench_apply(Path(tmp) / f"apply{r}.duckdb", calls))
            raw.append(bench_raw(Path(tmp) / f"raw{r}.duckdb", rows, args.per_apply))
    ratios = sorted(b / a for a, b in zip(applied, raw))
    print(f"apply ({args.format}): {args.rows / statistics.median(applied):,.0f} rows/s, "
          f"raw Arrow append: {args.rows / statistics.median(raw):,.0f} rows/s (medians of {args.rounds}, "
          f"{len(calls)} calls of {args.per_apply} envelopes); ratio median {statistics.median(ratios):.3f}x "
          f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
