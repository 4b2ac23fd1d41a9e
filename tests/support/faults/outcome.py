"""What a scenario found: the `Outcome` record, and the checks that read what landed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.support.faults.harness import TRANSPORT_ERRORS
from tests.support.processes import Pipeline, wait_until


@dataclass
class Outcome:
    scenario: str
    fault: str
    sent: int = 0  # activities sent (counting every distinct batch once)
    accepted: int = 0  # activities of batches answered 200
    landed: int = 0  # rows of this scenario found in the warehouse
    lost: int = 0  # accepted activities missing from the warehouse
    duplicated: int = 0  # rows beyond one per activity
    recovery_seconds: float | None = None  # fault removed -> service back (report only)
    recovery_what: str = ""
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or error name) -> count
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the whole scenario

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "fault": self.fault,
            "sent": self.sent,
            "accepted": self.accepted,
            "landed": self.landed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "recovery_seconds": None if self.recovery_seconds is None else round(self.recovery_seconds, 2),
            "recovery_what": self.recovery_what,
            "statuses": dict(self.statuses),
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


def timed(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
    def wrapper(*args: Any, **kwargs: Any) -> Outcome:
        started = time.monotonic()
        outcome = fn(*args, **kwargs)
        outcome.seconds = time.monotonic() - started
        return outcome

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def backlog(p: Pipeline) -> float | None:
    """Unacked messages of the local broker, from the subscriber's (or else the API's) /metrics."""
    for url in (p.admin_url, p.api_url):
        try:
            text = httpx.get(url + "/metrics", timeout=5).text
        except TRANSPORT_ERRORS:
            continue
        for line in text.splitlines():
            if line.startswith("broker_backlog_messages "):
                return float(line.split()[1])
    return None


def wait_backlog_empty(p: Pipeline, timeout: float = 180) -> None:
    wait_until(lambda: backlog(p) == 0, timeout=timeout, interval=0.2, what="an empty broker backlog")


def try_query(p: Pipeline, sql: str) -> list[tuple] | None:
    """Rows of a query through the subscriber's admin port, or None if it failed (no such table)."""
    r = httpx.post(p.admin_url + "/query", json={"sql": sql}, timeout=60)
    if r.status_code != 200:
        return None
    return [tuple(row) for row in r.json()["rows"]]


def marker_counts(p: Pipeline, tables: list[str]) -> dict[str, tuple[int, int]]:
    """marker -> (rows, distinct ids) over the given tables (ids are unique across them)."""
    out: dict[str, tuple[int, int]] = {}
    for t in tables:
        rows = try_query(p, f"SELECT marker, count(*), count(DISTINCT id) FROM {t} GROUP BY marker")
        for m, n, d in rows or []:
            n0, d0 = out.get(m, (0, 0))
            out[m] = (n0 + int(n), d0 + int(d))
    return out


def log_events(p: Pipeline, which: str) -> list[dict[str, Any]]:
    path = p.log_dir / f"{which}.log"
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut by kill -9
    return events


_RETRY_DELAY = re.compile(r"warehouse unavailable, retrying \S+ in ([0-9.]+)s")


def retry_delays(p: Pipeline) -> list[float]:
    """The backoff delays the subscriber logged for transient warehouse errors, in order."""
    out = []
    for e in log_events(p, "subscriber"):
        if "retry_in_seconds" in e:
            out.append(float(e["retry_in_seconds"]))
            continue
        m = _RETRY_DELAY.search(e.get("msg", ""))
        if m:
            out.append(float(m.group(1)))
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def dead_letters(p: Pipeline) -> list[dict[str, Any]]:
    out = p.cli("dead-letters", "list", "--json")
    if out.returncode != 0:
        raise RuntimeError(f"dead-letters list failed: {out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
