"""Bench section `gcp_upsert`: on the Google path (pstest -> bqemulator through the
counting fault layer), API calls and bytes billed per 10,000 upserts, next to inserts of
the same rows in the same run (`upsert_drain.bodies`: random keys, one table). Each
operation drains into a dataset of its own, so the billing estimate (`billing.py`) sees
only its own tables. Reported, no target (issue 17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from scripts.bench.gcp import _mixed_backlog, counted_google_path, provision
from scripts.bench.upsert_drain import bodies


def measure(tmp: Path, rows: int, keys: int, per_request: int, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "keys": keys, "per_request": per_request}
    with counted_google_path(tmp / "gcp_upsert", "bench_gcp_insert") as (p, counts, emu, _, _):
        p.start("api")
        for operation in ("insert", "upsert"):
            p.env["BIGQUERY_DATASET"] = f"bench_gcp_{operation}"
            provision(p)
            run = _mixed_backlog(p, counts, emu, bodies(operation, rows, keys, per_request), rows)
            p.kill("subscriber", 15)  # the next drain starts a subscriber on its own dataset
            out[operation] = run
            log(f"  {operation}: {run['calls_per_10k']:.0f} calls/10k, {run['query_jobs_per_10k']:.0f} query jobs/10k, "
                f"est. billed {run['estimated_bytes_billed_per_10k'] / 1e6:,.0f} MB/10k")
    return out


def bench_gcp_upsert(tmp: Path, results: dict[str, Any], rows: int, keys: int, per_request: int = 500,
                     log: Callable[[str], None] = print) -> None:
    """As `run.bench_gcp`: an emulator that cannot start is reported, not fatal."""
    try:
        results["gcp_upsert"] = measure(tmp, rows, keys, per_request, log)
    except BaseException as exc:  # pytest.skip() (emulator unavailable) raises a BaseException subclass
        if isinstance(exc, KeyboardInterrupt):
            raise
        results["gcp_upsert"] = {"error": f"not measured: {type(exc).__name__}: {exc}"[:500]}
        log(f"  Google path upserts not measured: {exc}")
