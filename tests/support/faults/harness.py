"""What the scenarios send and how: bodies, posts retried like a client, the processes."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.support.processes import Pipeline

TRANSPORT_ERRORS = (httpx.TransportError,)


def activity(op: str, table: str, names: list[str], types: list[str], values: list[Any]) -> dict[str, Any]:
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def rows_body(table: str, first_id: int, n: int, marker: str) -> dict[str, Any]:
    """n inserts with ids first_id.. and a `marker` column naming their batch."""
    return {
        "user_activities": [
            activity("insert", table, ["id", "marker"], ["integer", "string"], [i, marker])
            for i in range(first_id, first_id + n)
        ]
    }


def status_of(call: Callable[[], httpx.Response]) -> tuple[str, httpx.Response | None]:
    try:
        r = call()
    except TRANSPORT_ERRORS as exc:
        return type(exc).__name__, None
    return str(r.status_code), r


def post_until_accepted(post: Callable[[], httpx.Response], timeout: float = 120) -> tuple[httpx.Response, float, Counter]:
    """Retry like a client honouring Retry-After until a 200; (response, seconds, statuses seen)."""
    started = time.monotonic()
    seen: Counter = Counter()
    while True:
        status, r = status_of(post)
        seen[status] += 1
        if r is not None and r.status_code == 200:
            return r, time.monotonic() - started, seen
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no 200 within {timeout}s; saw {dict(seen)}")
        wait = 0.2
        if r is not None and r.headers.get("retry-after"):
            wait = min(float(r.headers["retry-after"]), 1.0)
        time.sleep(wait)


def start_pipeline(tmp: Path, **env: str) -> Pipeline:
    return Pipeline.create(Path(tmp), **env)
