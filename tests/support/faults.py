"""Fault scenarios against the real processes, shared by the fault tests and the report.

Each `scenario_*` function starts what it needs (API and subscriber processes through
`tests.support.processes.Pipeline`, lockers, emulators), injects one fault, lets the
pipeline recover by itself, and returns an `Outcome`: what was sent, accepted, landed,
lost and duplicated, how long recovery took, plus scenario-specific facts in `data`.

The functions never assert: `tests/e2e/test_faults.py` (and `test_faults_gcp.py`)
assert on the outcome, `scripts/reliability.py` writes it to `docs/reliability.md`.
Recovery times are measured for the report only; tests never assert on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from tests.support.processes import Pipeline, free_port, wait_until

TRANSPORT_ERRORS = (httpx.TransportError,)


# --------------------------------------------------------------------------- outcome


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


def _timed(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
    def wrapper(*args: Any, **kwargs: Any) -> Outcome:
        started = time.monotonic()
        outcome = fn(*args, **kwargs)
        outcome.seconds = time.monotonic() - started
        return outcome

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --------------------------------------------------------------------------- helpers


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


class Holder:
    """A helper process that holds a lock (SQLite write lock or DuckDB file) until stopped."""

    def __init__(self, code: str, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "locked":
            self.stop()
            raise RuntimeError(f"lock holder did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


SQLITE_LOCKER = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)
DUCKDB_LOCKER = (
    "import duckdb, sys\n"
    "c = duckdb.connect(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def _pipeline(tmp: Path, **env: str) -> Pipeline:
    return Pipeline.create(Path(tmp), **env)


# --------------------------------------------------------------------------- 1. subscriber kill -9


@_timed
def scenario_subscriber_kill9(
    tmp: Path, total: int = 100_000, per_request: int = 500, kills: int = 10, seed: int = 11
) -> Outcome:
    """kill -9 the subscriber at random points `kills` times while `total` activities stream in."""
    out = Outcome("subscriber kill -9", f"subscriber SIGKILLed {kills}x at random points during a {total:,}-row stream")
    p = _pipeline(tmp, ACK_DEADLINE_SECONDS="2")
    table = "stream"
    batches = total // per_request
    accepted: dict[str, int] = {}
    lock = threading.Lock()
    rng = random.Random(seed)
    stream_seconds = kills * 1.6  # spread the stream over the kills
    try:
        p.start("api")
        p.start("subscriber")

        def produce(worker: int, workers: int) -> None:
            with httpx.Client(timeout=60) as client:
                for b in range(worker, batches, workers):
                    marker = f"b{b}"
                    status, r = status_of(lambda: client.post(
                        p.api_url + "/api-log/v1/", json=rows_body(table, b * per_request, per_request, marker)))
                    with lock:
                        out.statuses[status] += 1
                        if status == "200":
                            accepted[marker] = per_request
                    time.sleep(stream_seconds * workers / batches)

        producers = [threading.Thread(target=produce, args=(w, 2)) for w in range(2)]
        for t in producers:
            t.start()
        done = 0
        while_streaming = 0
        restart_seconds = []
        while done < kills or any(t.is_alive() for t in producers):
            time.sleep(rng.uniform(0.2, 1.2))
            if done >= kills:
                continue
            while_streaming += any(t.is_alive() for t in producers)
            p.kill("subscriber", signal.SIGKILL)
            started = time.monotonic()
            p.start("subscriber")
            restart_seconds.append(time.monotonic() - started)
            done += 1
        for t in producers:
            t.join()
        last_restart = time.monotonic()
        out.data["kills"] = done
        out.data["kills_while_streaming"] = while_streaming
        out.sent = batches * per_request
        out.accepted = sum(accepted.values())
        wait_until(lambda: p.query(f"SELECT count(DISTINCT id) FROM {table}")[0][0] >= out.accepted,
                   timeout=240, interval=0.25, what="every accepted row")
        wait_backlog_empty(p)
        out.recovery_seconds = time.monotonic() - last_restart
        out.recovery_what = "last restart + end of stream -> every accepted row in DuckDB and backlog empty"
        count, distinct, lo, hi = p.query(f"SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {table}")[0]
        counts = marker_counts(p, [table])
        out.landed = int(count)
        out.duplicated = int(count) - int(distinct)
        out.lost = sum(n - counts.get(m, (0, 0))[1] for m, n in accepted.items())
        out.data.update(count=int(count), distinct=int(distinct), min_id=lo, max_id=hi,
                        unaccepted_landed=sum(n for m, (n, _) in counts.items() if m not in accepted),
                        restart_seconds_max=round(max(restart_seconds), 2) if restart_seconds else None)
        out.notes.append(f"ACK_DEADLINE_SECONDS=2 so leases of killed processes come back quickly; "
                         f"{done} kills, subscriber restart (to /healthz) took up to "
                         f"{out.data['restart_seconds_max']}s")
    finally:
        p.stop()
    return out


# --------------------------------------------------------------------------- 2. API kill -9


@_timed
def scenario_api_kill9(
    tmp: Path, clients: int = 6, min_batches_per_client: int = 20, rows: int = 100, kills: int = 5, seed: int = 5
) -> Outcome:
    """kill -9 the API under concurrent load; each batch spans two tables and carries a marker."""
    out = Outcome("API kill -9", f"API SIGKILLed {kills}x under {clients} concurrent clients")
    p = _pipeline(tmp)
    tables = ["ka", "kb"]
    results: dict[str, str] = {}  # marker -> status or error name
    lock = threading.Lock()
    rng = random.Random(seed)
    running = threading.Event()
    running.set()
    try:
        p.start("subscriber")
        p.start("api")

        def client_loop(c: int) -> None:
            n = 0
            with httpx.Client(timeout=30) as client:
                while running.is_set() or n < min_batches_per_client:
                    marker = f"c{c}-{n}"
                    first = (c * 100_000 + n) * rows
                    half = rows // 2
                    body = rows_body(tables[0], first, half, marker)
                    body["user_activities"] += rows_body(tables[1], first + half, rows - half, marker)["user_activities"]
                    status, _ = status_of(lambda: client.post(p.api_url + "/api-log/v1/", json=body))
                    with lock:
                        results[marker] = status
                        out.statuses[status] += 1
                    n += 1
                    if status != "200":
                        time.sleep(0.05)

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        restarts = []
        done = 0
        while done < kills:
            time.sleep(rng.uniform(0.3, 1.0))
            p.kill("api", signal.SIGKILL)
            started = time.monotonic()
            p.start("api")
            restarts.append(time.monotonic() - started)
            done += 1
        time.sleep(0.3)
        running.clear()
        for t in threads:
            t.join()
        out.data["kills"] = done
        wait_backlog_empty(p)
        counts = marker_counts(p, tables)
        total_batches = len(results)
        out.sent = total_batches * rows
        ok = [m for m, s in results.items() if s == "200"]
        failed = [m for m, s in results.items() if s != "200"]
        out.accepted = len(ok) * rows
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(rows - counts.get(m, (0, 0))[1] for m in ok)
        partial = sorted(m for m, (n, _) in counts.items() if n != rows)
        failed_whole = sorted(m for m in failed if counts.get(m, (0, 0))[0] == rows)
        out.data.update(
            batches=total_batches, ok_batches=len(ok), failed_batches=len(failed), partial_batches=partial,
            failed_but_wholly_in=len(failed_whole), accepted_missing=[m for m in ok if counts.get(m, (0, 0))[0] != rows],
            unknown_markers=sorted(set(counts) - set(results)),
        )
        out.recovery_seconds = max(restarts) if restarts else None
        out.recovery_what = "kill -> restarted API answers /healthz (slowest of the restarts)"
        out.notes.append(
            f"{len(failed)} of {total_batches} batches got no 200 (connection errors while the API was down); "
            f"{len(failed_whole)} of those were nevertheless wholly in (allowed: committed before the kill), "
            f"{len(partial)} batches partial"
        )
    finally:
        running.clear()
        p.stop()
    return out


# --------------------------------------------------------------------------- 3. local broker locked


@_timed
def scenario_broker_locked(tmp: Path, requests: int = 6, publish_timeout: float = 2.0) -> Outcome:
    """Another process holds the local broker's SQLite write lock (BEGIN EXCLUSIVE)."""
    out = Outcome("local broker locked", "another process holds BEGIN EXCLUSIVE on broker.sqlite")
    p = _pipeline(tmp, PUBLISH_TIMEOUT_SECONDS=str(publish_timeout))
    table = "brk"
    holder = None
    try:
        p.start("subscriber")
        p.start("api")
        sent_markers = ["before"]
        out.statuses[str(p.post(rows_body(table, 0, 5, "before")).status_code)] += 1
        holder = Holder(SQLITE_LOCKER, p.data_dir / "broker.sqlite")
        retry_after = set()
        latencies = []
        with httpx.Client(timeout=publish_timeout * 5 + 10) as client:
            for i in range(requests):
                marker = f"during{i}"
                started = time.monotonic()
                status, r = status_of(lambda: client.post(p.api_url + "/api-log/v1/", json=rows_body(table, 100 + i * 5, 5, marker)))
                latencies.append(time.monotonic() - started)
                out.statuses[status] += 1
                sent_markers.append(marker)
                if r is not None and r.status_code == 503:
                    retry_after.add(r.headers.get("retry-after"))
                    out.data.setdefault("body_503", r.json())
        out.data["readyz_while_locked"] = httpx.get(p.api_url + "/readyz", timeout=10).status_code
        holder.stop()
        released = time.monotonic()
        r, _, seen = post_until_accepted(
            lambda: httpx.post(p.api_url + "/api-log/v1/", json=rows_body(table, 10_000, 5, "after"),
                               headers={"Idempotency-Key": "brk-after"}, timeout=30))
        out.recovery_seconds = time.monotonic() - released
        out.recovery_what = "lock released -> first 200 (client honouring Retry-After)"
        out.statuses.update({f"after:{k}": v for k, v in seen.items()})
        sent_markers.append("after")
        wait_backlog_empty(p)
        wait_until(lambda: "after" in marker_counts(p, [table]), timeout=60, what="the batch after the lock")
        counts = marker_counts(p, [table])
        out.sent = 5 * len(sent_markers)
        out.accepted = 5 * (1 + out.statuses["200"])  # + the batch after the lock
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(5 - counts.get(m, (0, 0))[1] for m in ("before", "after"))
        out.data.update(retry_after=sorted(x or "" for x in retry_after), max_latency=round(max(latencies), 2),
                        landed_503=sorted(m for m in counts if m.startswith("during")))
        out.notes.append(f"PUBLISH_TIMEOUT_SECONDS={publish_timeout}: slowest 503 took {max(latencies):.2f}s; "
                         f"API /readyz while locked: {out.data['readyz_while_locked']}")
    finally:
        if holder is not None:
            holder.stop()
        p.stop()
    return out


# --------------------------------------------------------------------------- 4. backpressure


@_timed
def scenario_backpressure(
    tmp: Path, concurrency: int = 150, waves: int = 3, activities_per_request: int = 200, publish_timeout: float = 2.0
) -> Outcome:
    """Commits stall (write lock held) while bursts of concurrent requests arrive."""
    out = Outcome("backpressure", f"broker commits stalled; {waves} waves of {concurrency} concurrent requests")
    p = _pipeline(tmp, PUBLISH_TIMEOUT_SECONDS=str(publish_timeout))
    table = "bp"
    holder = None
    try:
        p.start("subscriber")
        api = p.start("api")
        holder = Holder(SQLITE_LOCKER, p.data_dir / "broker.sqlite")
        body = rows_body(table, 0, activities_per_request, "burst")
        rss = [rss_bytes(api.pid)]
        latencies: list[float] = []
        retry_after = Counter()

        async def burst() -> None:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            async with httpx.AsyncClient(timeout=publish_timeout * 5 + 10, limits=limits) as client:
                async def one() -> None:
                    started = time.monotonic()
                    try:
                        r = await client.post(p.api_url + "/api-log/v1/", json=body)
                        status = str(r.status_code)
                        retry_after[r.headers.get("retry-after")] += 1
                    except TRANSPORT_ERRORS as exc:
                        status = type(exc).__name__
                    latencies.append(time.monotonic() - started)
                    out.statuses[status] += 1

                await asyncio.gather(*(one() for _ in range(concurrency)))

        for _ in range(waves):
            asyncio.run(burst())
            rss.append(rss_bytes(api.pid))
        holder.stop()
        holder = None
        released = time.monotonic()
        _, _, seen = post_until_accepted(
            lambda: httpx.post(p.api_url + "/api-log/v1/", json=rows_body(table, 10**6, 1, "after"), timeout=30))
        out.recovery_seconds = time.monotonic() - released
        out.recovery_what = "lock released -> first 200"
        wait_until(lambda: "after" in marker_counts(p, [table]), timeout=60, what="the batch after the stall")
        counts = marker_counts(p, [table])
        out.sent = waves * concurrency * activities_per_request + 1
        out.accepted = out.statuses["200"] * activities_per_request + 1
        out.landed = sum(n for n, _ in counts.values())
        out.lost = 1 - counts.get("after", (0, 0))[0]
        out.data.update(
            rss_mib=[round(x / 2**20, 1) for x in rss], max_latency=round(max(latencies), 2),
            retry_after=dict(retry_after), burst_landed=counts.get("burst", (0, 0))[0],
        )
        out.notes.append(
            f"API RSS per wave (MiB): {out.data['rss_mib']}; slowest answer {max(latencies):.2f}s with "
            f"PUBLISH_TIMEOUT_SECONDS={publish_timeout}"
        )
    finally:
        if holder is not None:
            holder.stop()
        p.stop()
    return out


# --------------------------------------------------------------------------- 5. DuckDB locked


@_timed
def scenario_duckdb_locked(tmp: Path, batches: int = 5, backoff_max: float = 1.0, min_retries: int = 7) -> Outcome:
    """Another process holds the DuckDB file read-write while batches arrive."""
    out = Outcome("DuckDB locked", "another process holds warehouse.duckdb open read-write")
    p = _pipeline(tmp, RETRY_BACKOFF_MAX_SECONDS=str(backoff_max), ACK_DEADLINE_SECONDS="5")
    table = "whl"
    holder = None
    try:
        p.data_dir.mkdir(parents=True, exist_ok=True)
        p.start("api")
        holder = Holder(DUCKDB_LOCKER, p.data_dir / "warehouse.duckdb")
        p.start("subscriber")
        for b in range(batches):
            status, _ = status_of(lambda: p.post(rows_body(table, b * 10, 10, f"w{b}")))
            out.statuses[status] += 1
        wait_until(lambda: len(retry_delays(p)) >= min_retries, timeout=60, interval=0.2,
                   what=f"{min_retries} logged retries")
        ready = httpx.get(p.admin_url + "/readyz", timeout=10)
        out.data.update(readyz_status=ready.status_code, readyz=ready.json(), backlog_while_locked=backlog(p),
                        acked_while_locked=p.stats()["messages_acked"])
        holder.stop()
        holder = None
        released = time.monotonic()
        wait_backlog_empty(p, timeout=120)
        wait_until(lambda: sum(n for n, _ in marker_counts(p, [table]).values()) >= out.statuses["200"] * 10,
                   timeout=60, what="every accepted row")
        out.recovery_seconds = time.monotonic() - released
        out.recovery_what = "lock released -> backlog drained into DuckDB"
        delays = retry_delays(p)
        counts = marker_counts(p, [table])
        out.sent = batches * 10
        out.accepted = out.statuses["200"] * 10
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = out.accepted - sum(d for _, d in counts.values())
        out.data.update(delays=delays, backoff_max=backoff_max,
                        ready_after=httpx.get(p.admin_url + "/readyz", timeout=10).status_code)
        out.notes.append(f"RETRY_BACKOFF_MAX_SECONDS={backoff_max}; logged delays: {delays[:12]}"
                         f"{' ...' if len(delays) > 12 else ''}; /readyz while locked: {ready.status_code}")
    finally:
        if holder is not None:
            holder.stop()
        p.stop()
    return out


# --------------------------------------------------------------------------- 6. poison messages


@_timed
def scenario_poison(tmp: Path, max_attempts: int = 3, flow_batches: int = 6) -> Outcome:
    """Undecodable bytes and a never-applying message published into the broker, a type conflict via the API."""
    from app.broker.base import OutgoingMessage
    from app.broker.local import LocalBroker
    from app.settings import Settings

    out = Outcome("poison messages", "garbage bytes + a message DuckDB can never apply + a type conflict")
    p = _pipeline(tmp, MAX_DELIVERY_ATTEMPTS=str(max_attempts))
    try:
        p.start("subscriber")
        p.start("api")
        broker = LocalBroker(Settings(data_dir=p.data_dir))
        stuck_body = {"v": 1, "batch_id": "stuckbatch", "table": "stuck", "activities": [
            {"operation": "insert", "col_names": ["id", "marker", "d"], "col_types": ["integer", "string", "date"],
             "col_values": [1, "stuck", "2021-02-30"]}]}
        try:
            asyncio.run(broker.publish([
                OutgoingMessage(b"\x00\xff{not json at all", "garbage",
                                {"table": "garbage", "dedup_id": "garbage:garbage:0", "batch_id": "garbage"}),
                OutgoingMessage(json.dumps(stuck_body).encode(), "stuck",
                                {"table": "stuck", "dedup_id": "stuckbatch:stuck:0", "batch_id": "stuckbatch"}),
            ], batch_id="poison"))
        finally:
            broker.close()
        out.sent += 2
        # A table and a type conflict through the API.
        statuses = []
        statuses.append(p.post({"user_activities": [activity("insert", "conflict", ["id", "marker"], ["integer", "string"], [1, "ok"])]}).status_code)
        statuses.append(p.post({"user_activities": [activity("insert", "conflict", ["id", "marker"], ["string", "string"], ["x", "bad"])]}).status_code)
        out.sent += 2
        # The rest keeps flowing, including later rows of the stuck table.
        for b in range(flow_batches):
            statuses.append(p.post(rows_body("flow", b * 10, 10, f"f{b}")).status_code)
            out.sent += 10
        statuses.append(p.post(rows_body("stuck", 100, 3, "later")).status_code)
        out.sent += 3
        out.statuses.update(str(s) for s in statuses)
        wait_until(lambda: sum(n for n, _ in marker_counts(p, ["flow"]).values()) == flow_batches * 10,
                   timeout=60, what="the flow table")
        wait_until(lambda: len(dead_letters(p)) >= 3, timeout=90, interval=0.3, what="three dead letters")
        wait_until(lambda: marker_counts(p, ["stuck"]).get("later") == (3, 3), timeout=60, what="later rows of the stuck table")
        wait_backlog_empty(p)
        letters = dead_letters(p)
        counts = marker_counts(p, ["flow", "stuck", "conflict"])
        out.accepted = 1 + 1 + flow_batches * 10 + 3  # activities the API accepted
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = (flow_batches * 10 + 3 + 1) - out.landed  # everything but the conflict and the stuck row
        out.data.update(dead_letters=letters, counts=counts)
        out.notes.append("dead letters: " + "; ".join(
            f"{letter.get('kind')} of {letter.get('table')} after {letter.get('attempts')} attempt(s): "
            f"{str(letter.get('reason'))[:90]}"
            for letter in letters))
    finally:
        p.stop()
    return out


# --------------------------------------------------------------------------- 7. idempotent retries


@_timed
def scenario_idempotent_retries(tmp: Path, batches: int = 30, rows: int = 20, kills: int = 2, seed: int = 3) -> Outcome:
    """Clients retry every batch with its Idempotency-Key across API kills; plus a re-published chunk."""
    from app.broker.local import LocalBroker
    from app.messages.codec import encode_batch
    from app.schema.validation import validate_batch
    from app.settings import Settings

    out = Outcome("idempotent retries", f"each batch retried with the same Idempotency-Key; API SIGKILLed {kills}x")
    p = _pipeline(tmp)
    table = "idem"
    rng = random.Random(seed)
    try:
        p.start("subscriber")
        p.start("api")
        batch_ids: dict[str, set[str]] = {}
        attempts = Counter()
        lock = threading.Lock()

        def client_loop(c: int) -> None:
            for n in range(c, batches, 3):
                marker = f"i{n}"
                body = rows_body(table, n * rows, rows, marker)
                # Every batch is sent twice at least: a retry after a 200 must be a replay.
                for _ in range(2):
                    r, _, seen = post_until_accepted(lambda: httpx.post(
                        p.api_url + "/api-log/v1/", json=body, headers={"Idempotency-Key": f"key-{marker}"}, timeout=10))
                    with lock:
                        batch_ids.setdefault(marker, set()).add(r.json()["batch_id"])
                        attempts[marker] += sum(seen.values())
                        out.statuses.update(seen)
                        out.statuses["replayed" if r.headers.get("idempotent-replayed") == "true" else "first"] += 1

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 0.6))
            p.kill("api", signal.SIGKILL)
            p.start("api")
        for t in threads:
            t.join()
        # After all kills, a plain retry of the first batch across the restart is still a replay.
        p.kill("api", signal.SIGKILL)
        p.start("api")
        r = p.post(rows_body(table, 0, rows, "i0"), headers={"Idempotency-Key": "key-i0"})
        out.data["replay_after_restart"] = (r.status_code, r.headers.get("idempotent-replayed"),
                                            r.json().get("batch_id") in batch_ids.get("i0", set()))
        # A chunk re-published with the same dedup_id (what Pub/Sub may do) is applied once.
        body = rows_body("repub", 0, 5, "repub")
        messages = encode_batch(validate_batch(body, max_activities=100, max_columns=10,
                                               max_value_bytes=1024, max_record_depth=5), "repubbatch")
        broker = LocalBroker(Settings(data_dir=p.data_dir))
        try:
            for _ in range(3):
                asyncio.run(broker.publish(messages, batch_id="repubbatch"))
        finally:
            broker.close()
        wait_backlog_empty(p)
        wait_until(lambda: "repub" in marker_counts(p, ["repub"]), timeout=60, what="the re-published chunk")
        counts = marker_counts(p, [table])
        repub = marker_counts(p, ["repub"])["repub"]
        out.sent = batches * rows
        out.accepted = batches * rows
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values()) + (repub[0] - repub[1])
        out.lost = sum(rows - counts.get(f"i{n}", (0, 0))[1] for n in range(batches))
        out.data.update(batch_ids_per_key=max(len(v) for v in batch_ids.values()), repub=repub,
                        total_attempts=sum(attempts.values()), wrong_counts={m: c for m, c in counts.items() if c != (rows, rows)})
        out.notes.append(f"{sum(attempts.values())} POSTs for {batches} batches (every batch at least twice); "
                         f"a 5-row chunk published 3x with one dedup_id landed {repub[0]} rows ({repub[1]} distinct)")
    finally:
        p.stop()
    return out


# --------------------------------------------------------------------------- 8. hostile input

HOSTILE_NAMES = [
    "t'; DROP TABLE victim; --",
    'x"; DROP TABLE victim; --',
    "x`; DROP TABLE victim; --",
    "victim; DELETE FROM victim",
    "victim -- comment",
    "victim/* c */",
    "vict\u0456m",  # Cyrillic i
    "\u0430ccounts",  # Cyrillic a
    "t\u200bx",  # zero-width space
    "t x",
    "",
    "1abc",
    "a" * 1025,
    "main.victim",
    "victim\x00",
    "_ingest_applied",
]

HOSTILE_VALUES = [
    "x'); DROP TABLE victim; --",
    "'; DELETE FROM victim WHERE '1'='1",
    '"; DROP TABLE "victim"; --',
    "`victim`; DROP TABLE `victim`",
    "/* */ SELECT * FROM victim /*",
    "-- just a comment",
    "1; ATTACH '/tmp/evil.db' AS evil; --",
    "COPY victim TO '/tmp/leak.csv'",
    "\u0430dmin' OR 1=1 --",
    "x\\'; DROP TABLE victim; --",
    "\x00 NUL inside",
    "{{7*7}} ${7*7} %s %n",
    "'" * 1000,
    "\u00e9" * 50_000 + "'; DROP TABLE victim; --",
]


@_timed
def scenario_injection(tmp: Path) -> Outcome:
    """Hostile identifiers (must be 422 naming the field) and values (stored literally)."""
    out = Outcome("SQL injection", "identifiers and values carrying quotes, ;, comments, look-alikes, long text")
    p = _pipeline(tmp)
    try:
        p.start("subscriber")
        p.start("api")
        victim = {"user_activities": [activity("insert", "victim", ["id", "marker"], ["integer", "string"], [i, "v"])
                                      for i in range(3)]}
        if p.post(victim).status_code != 200:
            raise RuntimeError("victim batch refused")
        refused_naming_field = 0
        for name in HOSTILE_NAMES:
            for body, loc in (
                ({"user_activities": [activity("insert", name, ["id"], ["integer"], [1])]}, "user_activities[0].table"),
                ({"user_activities": [activity("insert", "victim", ["id", name], ["integer", "string"], [1, "x"])]},
                 "user_activities[0].col_names[1]"),
            ):
                r = p.post(body)
                out.statuses[f"identifier:{r.status_code}"] += 1
                if r.status_code == 422 and [d["loc"] for d in r.json()["details"]] == [loc]:
                    refused_naming_field += 1
        rows = [activity("insert", "hostile", ["id", "marker", "meta"], ["integer", "string", "record"], [i, v, {v: v}])
                for i, v in enumerate(HOSTILE_VALUES)]
        r = p.post({"user_activities": rows})
        out.statuses[f"values:{r.status_code}"] += 1
        wait_until(lambda: (try_query(p, "SELECT count(*) FROM hostile") or [(0,)])[0][0] == len(HOSTILE_VALUES),
                   timeout=60, what="hostile values")
        stored = {i: (m, meta) for i, m, meta in p.query("SELECT id, marker, CAST(meta AS VARCHAR) FROM hostile")}
        equal = sum(1 for i, v in enumerate(HOSTILE_VALUES)
                    if stored.get(i, (None, None))[0] == v and json.loads(stored[i][1]) == {v: v})
        tables = sorted(t for (t,) in p.query("SELECT table_name FROM information_schema.tables")
                        if not t.startswith("_ingest_"))
        out.sent = 2 * len(HOSTILE_NAMES) + len(HOSTILE_VALUES)
        out.accepted = len(HOSTILE_VALUES) if r.status_code == 200 else 0
        out.landed = len(stored)
        out.lost = out.accepted - equal
        out.data.update(identifiers=2 * len(HOSTILE_NAMES), refused_naming_field=refused_naming_field,
                        values=len(HOSTILE_VALUES), read_back_equal=equal, tables=tables,
                        victim_rows=p.query("SELECT count(*) FROM victim")[0][0])
        out.notes.append(f"{refused_naming_field}/{2 * len(HOSTILE_NAMES)} hostile identifiers refused with 422 "
                         f"naming the field; {equal}/{len(HOSTILE_VALUES)} hostile values read back equal; "
                         f"tables afterwards: {tables}; victim rows: {out.data['victim_rows']}")
    finally:
        p.stop()
    return out


# --------------------------------------------------------------------------- Google emulators


@_timed
def scenario_pubsub_down(tmp: Path, requests: int = 4, publish_timeout: float = 2.0) -> Outcome:
    """The Pub/Sub emulator stops; API answers 503; after a restart on the same port it resumes."""
    from tests.support.pstest import start_pstest

    out = Outcome("Pub/Sub emulator stopped", "pstest killed, then restarted on the same port (fresh state)")
    port = free_port()
    cm = start_pstest(port=port)
    address, proc = cm.__enter__()
    p = _pipeline(tmp, BROKER="pubsub", PUBSUB_EMULATOR_HOST=address, GCP_PROJECT="fault-project",
                  PUBLISH_TIMEOUT_SECONDS=str(publish_timeout), ACK_DEADLINE_SECONDS="10", PROVISION_BIGQUERY="false")
    table = "psd"
    try:
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        p.start("subscriber")
        p.start("api")
        r = p.post(rows_body(table, 0, 5, "before"))
        out.statuses[str(r.status_code)] += 1
        wait_until(lambda: "before" in marker_counts(p, [table]), timeout=90, what="the first batch")
        proc.kill()
        proc.wait(timeout=10)
        retry_after = set()
        for i in range(requests):
            status, r = status_of(lambda: httpx.post(p.api_url + "/api-log/v1/", json=rows_body(table, 100 + i * 5, 5, f"down{i}"),
                                                      timeout=publish_timeout * 5 + 10))
            out.statuses[status] += 1
            if r is not None and r.status_code == 503:
                retry_after.add(r.headers.get("retry-after"))
        out.data["readyz_while_down"] = httpx.get(p.api_url + "/readyz", timeout=30).status_code
        cm.__exit__(None, None, None)
        cm = start_pstest(port=port)
        address2, proc = cm.__enter__()
        restarted = time.monotonic()
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"re-provision failed: {prov.stdout}{prov.stderr}")
        r, _, seen = post_until_accepted(lambda: httpx.post(
            p.api_url + "/api-log/v1/", json=rows_body(table, 1000, 5, "after"), headers={"Idempotency-Key": "psd-after"},
            timeout=30), timeout=120)
        out.recovery_seconds = time.monotonic() - restarted
        out.recovery_what = "emulator restarted (+ re-provisioned) -> first 200"
        out.statuses.update({f"after:{k}": v for k, v in seen.items()})
        wait_until(lambda: "after" in marker_counts(p, [table]), timeout=120, interval=0.5,
                   what="the batch after the restart to land (subscriber reconnects by itself)")
        counts = marker_counts(p, [table])
        out.sent = 5 * (2 + requests)
        out.accepted = 10
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(5 - counts.get(m, (0, 0))[1] for m in ("before", "after"))
        out.data.update(retry_after=sorted(x or "" for x in retry_after), same_address=address2 == address,
                        landed_503=sorted(m for m in counts if m.startswith("down")))
        out.notes.append("pstest keeps no state across a restart: topic and subscription are re-provisioned "
                         "(`python -m app provision`); the subscriber re-opens its streaming pull by itself")
    finally:
        p.stop()
        cm.__exit__(None, None, None)
    return out


RETRY_WINDOW_SECONDS = 90  # bigquery_down: at most the 10 s call deadline per attempt, 5 attempts, on a busy machine


@_timed
def scenario_bigquery_down(tmp: Path, batches: int = 3, backoff_max: float = 1.0, min_retries: int = 5) -> Outcome:
    """The BigQuery emulator stops while batches wait; the subscriber retries with capped backoff."""
    from tests.support import bqemulator

    out = Outcome("BigQuery emulator stopped", "bqemulator killed while batches arrive, then a new one on the same ports")
    emu_cm = bqemulator.running_bqemulator()
    emu = emu_cm.__enter__()
    p = _pipeline(tmp, WAREHOUSE="bigquery", BIGQUERY_EMULATOR_HOST=emu.rest, BIGQUERY_EMULATOR_GRPC_HOST=emu.grpc,
                  GCP_PROJECT=emu.project, RETRY_BACKOFF_MAX_SECONDS=str(backoff_max), ACK_DEADLINE_SECONDS="5",
                  PROVISION_PUBSUB="false")
    table = "bqd"
    try:
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        p.start("subscriber")
        p.start("api")
        if p.post(rows_body(table, 0, 5, "before")).status_code != 200:
            raise RuntimeError("the batch before the fault was refused")
        wait_until(lambda: "before" in marker_counts(p, [table]), timeout=120, interval=0.5, what="the first batch")
        emu_cm.__exit__(None, None, None)
        emu_cm = None
        before = len(retry_delays(p))
        for b in range(batches):
            status, _ = status_of(lambda: p.post(rows_body(table, 100 + b * 5, 5, f"down{b}")))
            out.statuses[status] += 1
        try:
            # Each attempt against a stopped emulator spends the client's 10 s call deadline first.
            wait_until(lambda: len(retry_delays(p)) - before >= min_retries, timeout=RETRY_WINDOW_SECONDS, interval=0.3,
                       what=f"{min_retries} logged retries")
        except AssertionError:
            raise RuntimeError(
                f"the subscriber logged {len(retry_delays(p)) - before} backoff retries in {RETRY_WINDOW_SECONDS} s after the emulator "
                "stopped: it is blocked inside one BigQuery client call (google-cloud-bigquery's default retry "
                "goes on for up to 600 s), so it neither backs off with its own capped delays nor releases the "
                "warehouse lock that the admin port's /readyz also takes"
            ) from None
        out.data.update(backlog_while_down=backlog(p), readyz_while_down=httpx.get(p.admin_url + "/readyz", timeout=30).status_code)
        emu_cm = _bqemulator_on(emu)
        restarted = time.monotonic()
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"re-provision failed: {prov.stdout}{prov.stderr}")
        wait_backlog_empty(p, timeout=180)
        wait_until(lambda: all(f"down{b}" in marker_counts(p, [table]) for b in range(batches)), timeout=120,
                   interval=0.5, what="the batches sent while it was down")
        out.recovery_seconds = time.monotonic() - restarted
        out.recovery_what = "emulator restarted (+ re-provisioned) -> backlog drained into BigQuery"
        counts = marker_counts(p, [table])
        out.sent = 5 * (1 + batches)
        out.accepted = 5 * (1 + out.statuses["200"])
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(5 - counts.get(m, (0, 0))[1] for m in [f"down{b}" for b in range(batches)])
        out.data.update(delays=retry_delays(p)[before:], backoff_max=backoff_max)
        out.notes.append("the emulator is in-memory: rows from before the stop are gone with it; "
                         "only the batches sent while it was down are counted as lost/landed")
    finally:
        p.stop()
        if emu_cm is not None:
            emu_cm.__exit__(None, None, None)
    return out


def _bqemulator_on(emu: Any):
    """Start bqemulator again on the same REST and gRPC ports; returns an entered context manager."""
    from tests.support import bqemulator

    rest_port = int(emu.rest.rsplit(":", 1)[1])
    grpc_port = int(emu.grpc.rsplit(":", 1)[1])
    ports = iter([rest_port, grpc_port])
    original = bqemulator._free_port
    bqemulator._free_port = lambda: next(ports)
    try:
        cm = bqemulator.running_bqemulator(emu.project)
        cm.__enter__()
    finally:
        bqemulator._free_port = original
    return cm


# --------------------------------------------------------------------------- Google's behaviour, in front of the emulators
#
# The fault layer (`tests/support/fault_proxy`) sits between the processes and pstest /
# bqemulator: BigQuery REST errors in Google's JSON shape, AppendRows refusing a new
# column for a while, Pub/Sub ordering keys enforced, leases that expire and delivery
# attempts counted with the subscription's dead-letter policy applied. Every fault is
# armed by count (or seconds), so the scenarios are deterministic and take seconds.

DEAD_LETTER_ATTEMPTS = 5  # Pub/Sub's minimum for a dead-letter policy
# Fault counts are at least DEAD_LETTER_ATTEMPTS: a pipeline that spends one delivery per
# transient error dead-letters healthy data; one that retries in place does not.


@dataclass
class GoogleStack:
    """The processes, wired to the emulators through the fault layer."""

    p: Pipeline
    pstest: str  # upstream pstest address (the dead-letter subscription is read there, past the gate)
    rest: Any  # fault_proxy.BigQueryRestProxy
    storage_write: Any  # fault_proxy.StorageWriteFaults
    gate: Any  # fault_proxy.OrderingGate
    bq_grpc: Any  # fault_proxy.GrpcProxy (Storage Write)
    ps_grpc: Any  # fault_proxy.GrpcProxy (Pub/Sub)
    dataset: str
    emulator: Any  # bqemulator.BqEmulator: the test's own reads go straight there, past the faults

    def table(self, name: str) -> str:
        return f"{self.dataset}.{name}"

    def query(self, sql: str) -> list[tuple] | None:
        """Rows of a query run directly on the emulator (not through the fault layer), None on error."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        from app.warehouse.bigquery.client import _EMULATOR_LOCK as emulator_calls

        client = bigquery.Client(project=self.emulator.project, credentials=AnonymousCredentials(),
                                 client_options=ClientOptions(api_endpoint=f"http://{self.emulator.rest}"))
        try:
            with emulator_calls:  # never alongside the subscriber's calls: bqemulator deadlocks
                return [tuple(r.values()) for r in client.query_and_wait(sql)]
        except Exception:
            return None
        finally:
            client.close()

    def marker_counts(self, tables: list[str]) -> dict[str, tuple[int, int]]:
        """marker -> (rows, distinct ids) over the given tables of this stack's dataset."""
        out: dict[str, tuple[int, int]] = {}
        for t in tables:
            for m, n, d in self.query(f"SELECT marker, count(*), count(DISTINCT id) FROM {self.table(t)} GROUP BY marker") or []:
                n0, d0 = out.get(m, (0, 0))
                out[m] = (n0 + int(n), d0 + int(d))
        return out

    def dead_letter_store(self) -> list[dict[str, Any]]:
        return dead_letters(self.p)

    def dead_letter_topic(self) -> list[dict[str, str]]:
        """Messages on the dead-letter topic (read through its subscription, then released)."""
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport
        import grpc

        name = f"projects/{self.p.env['GCP_PROJECT']}/subscriptions/{self.p.env['PUBSUB_SUBSCRIPTION']}-dead-letter"
        client = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.pstest)))
        try:
            got = client.pull(request={"subscription": name, "max_messages": 1000}, timeout=10)  # pstest: waits 0.5 s at most
            ids = [m.ack_id for m in got.received_messages]
            if ids:
                client.modify_ack_deadline(request={"subscription": name, "ack_ids": ids, "ack_deadline_seconds": 0})
            return [dict(m.message.attributes) for m in got.received_messages]
        finally:
            client.close()

    def applied_messages(self, table: str) -> list[int]:
        """How many messages each logged apply of `table` carried, in order."""
        return [int(e["messages"]) for e in log_events(self.p, "subscriber")
                if e.get("msg") == "applied" and e.get("table") == table and "messages" in e]


@contextlib.contextmanager
def google_stack(tmp: Path, *, schema_lag_seconds: float = 0.0, expire_leases_after: float | None = None,
                 expiring_leases: int | None = None, **env: str) -> Iterator[GoogleStack]:
    """pstest + a bqemulator of its own, the fault proxies in front, the processes provisioned but not started.

    Its own emulator: faults, lease expiries and restarts leave the emulator's state where
    the session's shared one must stay clean for the tests after.
    """
    from tests.support.bqemulator import running_bqemulator
    from tests.support.fault_proxy import BigQueryRestProxy, GrpcProxy, OrderingGate, SchemaVisibility, StorageWriteFaults
    from tests.support.pstest import running_pstest

    with contextlib.ExitStack() as stack:
        emu = stack.enter_context(running_bqemulator())
        pstest = stack.enter_context(running_pstest())
        lag = SchemaVisibility(schema_lag_seconds)
        rest = stack.enter_context(BigQueryRestProxy(emu.rest, schema=lag))
        storage_write = StorageWriteFaults(lag)
        bq_grpc = stack.enter_context(GrpcProxy(emu.grpc, storage_write=storage_write))
        gate = OrderingGate(expire_leases_after=expire_leases_after, expiring_leases=expiring_leases)
        stack.callback(gate.close)
        ps_grpc = stack.enter_context(GrpcProxy(pstest, pubsub=gate))
        suffix = f"{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        dataset = f"faults_{suffix}"
        p = _pipeline(
            tmp, BROKER="pubsub", WAREHOUSE="bigquery", GCP_PROJECT=emu.project,
            PUBSUB_EMULATOR_HOST=ps_grpc.address, PUBSUB_TOPIC=f"act-{suffix}", PUBSUB_SUBSCRIPTION=f"act-sub-{suffix}",
            BIGQUERY_EMULATOR_HOST=rest.address, BIGQUERY_EMULATOR_GRPC_HOST=bq_grpc.address, BIGQUERY_DATASET=dataset,
            ACK_DEADLINE_SECONDS="10", MAX_DELIVERY_ATTEMPTS=str(DEAD_LETTER_ATTEMPTS), RETRY_BACKOFF_MAX_SECONDS="1",
            **env,
        )  # fmt: skip
        stack.callback(p.stop)
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        rest.reset_counts()
        yield GoogleStack(p, pstest, rest, storage_write, gate, bq_grpc, ps_grpc, dataset, emu)


def _google_outcome(out: Outcome, g: GoogleStack, tables: list[str], expected: dict[str, int]) -> Outcome:
    """Fill landed/lost/duplicated from marker counts and the dead letters from both places."""
    counts = g.marker_counts(tables)
    out.sent = out.accepted = sum(expected.values())
    out.landed = sum(n for n, _ in counts.values())
    out.duplicated = sum(n - d for n, d in counts.values())
    out.lost = sum(max(0, want - counts.get(m, (0, 0))[1]) for m, want in expected.items())
    out.data.update(
        dead_letter_store=g.dead_letter_store(), dead_letter_topic=g.dead_letter_topic(),
        gate_dead_lettered=list(g.gate.dead_lettered), faults=dict(g.rest.faults), calls=dict(g.rest.calls),
        appends_refused=dict(g.storage_write.rejected), ordering_violations=list(g.gate.violations),
        leases_expired=g.gate.expired, late_acks=g.gate.late_acks,
    )  # fmt: skip
    d = out.data
    out.notes.append(
        f"faults served {sum(d['faults'].values())} {dict(d['faults'])}, appends refused {sum(d['appends_refused'].values())}, "
        f"leases expired {d['leases_expired']} (late acks dropped {d['late_acks']}); dead letters: store "
        f"{len(d['dead_letter_store'])}, topic {len(d['dead_letter_topic'])}, by Pub/Sub's policy {len(d['gate_dead_lettered'])}"
    )
    return out


def _post_ok(p: Pipeline, body: dict[str, Any]) -> None:
    r = p.post(body)
    if r.status_code != 200:
        raise RuntimeError(f"batch refused: {r.status_code} {r.text}")


def _wait_markers(g: GoogleStack, tables: list[str], expected: dict[str, int], timeout: float = 120) -> None:
    """Until every marker has its rows (or something reached a dead-letter place: stop early, report it)."""

    def done() -> bool:
        counts = g.marker_counts(tables)
        if all(counts.get(m, (0, 0))[1] >= n for m, n in expected.items()):
            return True
        return bool(g.gate.dead_lettered) or bool(g.dead_letter_store())

    try:
        wait_until(done, timeout=timeout, interval=0.5, what=f"markers {sorted(expected)} to land")
    except AssertionError:
        pass  # the outcome reports what is missing


def _metric_mean(p: Pipeline, name: str) -> float:
    """Mean of a Prometheus histogram/summary on the subscriber's /metrics (`_sum` / `_count`), 0 if absent."""
    text = httpx.get(p.admin_url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " ") or line.startswith(name + suffix + "{"):
                values[suffix] = values.get(suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return values["_sum"] / values["_count"] if values.get("_count") else 0.0


def _note_body(table: str, first_id: int, n: int, marker: str) -> dict[str, Any]:
    """n inserts that also carry a new column `note` (the table gets a column added)."""
    return {"user_activities": [
        activity("insert", table, ["id", "marker", "note"], ["integer", "string", "string"], [i, marker, f"n{i}"])
        for i in range(first_id, first_id + n)
    ]}


@_timed
def scenario_bigquery_quota(tmp: Path, reason: str = "quotaExceeded", times: int = 6) -> Outcome:
    """BigQuery answers job and table calls with 403 quotaExceeded / rateLimitExceeded (Google's JSON)."""
    from tests.support.fault_proxy import errors

    error = errors.quota_exceeded() if reason == "quotaExceeded" else errors.rate_limit_exceeded()
    out = Outcome(f"BigQuery 403 {reason}", f"{times} job/table calls answered 403 {reason} in Google's error shape")
    table = "quota"
    with google_stack(tmp) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 5, "before"))
        _wait_markers(g, [table], {"before": 5})
        g.rest.add(error, errors.QUERY_KINDS | errors.TABLE_UPDATE_KINDS | {"tables.get", "tables.insert"}, times=times)
        _post_ok(g.p, _note_body(table, 100, 5, "during"))  # adds a column while the quota bites
        _post_ok(g.p, rows_body(table, 200, 5, "after"))
        expected = {"before": 5, "during": 5, "after": 5}
        _wait_markers(g, [table], expected)
        out.data["faults_left"] = sum(max(0, (r.times or 0) - r.hits) for r in g.rest.rules)
        return _google_outcome(out, g, [table], expected)


@_timed
def scenario_bigquery_dml_queue(tmp: Path, queue_full: int = 3, concurrent: int = 2) -> Outcome:
    """DELETE jobs fail with the DML queue's 400 resourcesExceeded, then with 'concurrent update'."""
    from tests.support.fault_proxy import errors

    out = Outcome("BigQuery DML queue full / concurrent update",
                  f"{queue_full} DELETE jobs answered 'Too many DML statements outstanding', {concurrent} 'Could not serialize access'")
    table = "dml"
    with google_stack(tmp) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 6, "base"))
        _wait_markers(g, [table], {"base": 6})
        g.rest.add(errors.dml_queue_full(table), errors.QUERY_KINDS, times=queue_full, sql=r"^\s*DELETE\b")
        g.rest.add(errors.concurrent_update(table), errors.QUERY_KINDS, times=concurrent, sql=r"^\s*DELETE\b")
        # Ordered on one key: delete ids 0-2, then insert id 1 again; the end state depends on order.
        for i in range(3):
            _post_ok(g.p, {"user_activities": [activity("delete", table, ["id"], ["integer"], [i])]})
        _post_ok(g.p, rows_body(table, 1, 1, "again"))
        _post_ok(g.p, rows_body(table, 50, 2, "tail"))
        _wait_markers(g, [table], {"again": 1, "tail": 2})
        ids = lambda: sorted(r[0] for r in g.query(f"SELECT id FROM {g.table(table)}") or [])  # noqa: E731
        try:
            wait_until(lambda: ids() == [1, 3, 4, 5, 50, 51] or bool(g.dead_letter_store()) or bool(g.gate.dead_lettered),
                       timeout=60, interval=0.5, what="the deletes to apply")
        except AssertionError:
            pass  # the outcome shows the ids
        out.data["ids"] = ids()
        return _google_outcome(out, g, [table], {"again": 1, "tail": 2, "base": 3})


@_timed
def scenario_new_column_not_yet_visible(tmp: Path, lag_seconds: float = 10.0) -> Outcome:
    """A column is added; the write stream refuses rows carrying it for `lag_seconds` (SCHEMA_MISMATCH_EXTRA_FIELDS)."""
    out = Outcome("Storage Write: new column not yet visible",
                  f"AppendRows refuses rows with a just-added column for {lag_seconds:g} s, as Google's write stream does")
    wide, other = "wide", "other"
    with google_stack(tmp, schema_lag_seconds=lag_seconds) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(wide, 0, 3, "before"))
        _wait_markers(g, [wide], {"before": 3})
        _post_ok(g.p, _note_body(wide, 100, 4, "with_note"))
        _post_ok(g.p, rows_body(other, 500, 3, "other"))
        _post_ok(g.p, rows_body(wide, 200, 2, "after_note"))
        expected = {"before": 3, "with_note": 4, "after_note": 2, "other": 3}
        _wait_markers(g, [other], {"other": 3}, timeout=60)
        # Did the other table go on while `wide` waited for its column? (no clock: the lag's own state)
        out.data["other_landed_while_column_hidden"] = bool(g.storage_write.visibility.hidden(g.dataset, wide, ["note"]))
        _wait_markers(g, [wide, other], expected)
        out.data["added"] = sorted(g.storage_write.visibility.added(g.dataset, wide))
        notes = g.query(f"SELECT count(*) FROM {g.table(wide)} WHERE note IS NOT NULL") or [(0,)]
        out.data["notes_landed"] = int(notes[0][0])
        return _google_outcome(out, g, [wide, other], expected)


@_timed
def scenario_lease_expiry(tmp: Path, lease_seconds: float = 2.0, slow_seconds: float = 4.0) -> Outcome:
    """The first lease runs out while BigQuery is slow: the late ack is dropped and the message comes back."""
    out = Outcome("Pub/Sub lease expired during a slow apply",
                  f"first delivery's lease capped at {lease_seconds:g} s while a BigQuery call takes {slow_seconds:g} s")
    table = "lease_t"
    with google_stack(tmp, expire_leases_after=lease_seconds, expiring_leases=1) as g:
        g.p.start("subscriber")
        g.p.start("api")
        # the first call of the first apply that names the table (not the subscriber's start-up calls)
        g.rest.add(None, {"jobs.insert", "jobs.query", "tables.get", "tables.insert"}, times=1, delay=slow_seconds,
                   target=r"\blease_t\b")
        _post_ok(g.p, rows_body(table, 0, 5, "slow"))
        _post_ok(g.p, rows_body(table, 10, 5, "next"))
        expected = {"slow": 5, "next": 5}
        _wait_markers(g, [table], expected)
        # the redelivery and the late ack happen after the rows landed: give them a moment
        wait_until(lambda: g.gate.expired >= 1, timeout=30, interval=0.2, what="the lease to expire")
        time.sleep(2)
        return _google_outcome(out, g, [table], expected)


@_timed
def scenario_one_table_backlog(tmp: Path, messages: int = 60) -> Outcome:
    """A backlog of one table (one message per request, published while the subscriber is stopped) drains."""
    out = Outcome("One-table backlog under ordering", f"{messages} messages for one table published while the subscriber is down")
    table = "backlog"
    with google_stack(tmp) as g:
        g.p.start("api")
        for i in range(messages):
            _post_ok(g.p, rows_body(table, i, 1, f"b{i}"))
        g.p.start("subscriber")
        expected = {f"b{i}": 1 for i in range(messages)}
        _wait_markers(g, [table], expected, timeout=240)
        applies = g.applied_messages(table)
        per_apply = (sum(applies) / len(applies)) if applies else _metric_mean(g.p, "pipeline_messages_per_apply")
        out.data.update(applies=len(applies), messages_per_apply=per_apply, max_per_pull=g.gate.max_messages_per_key_per_pull)
        return _google_outcome(out, g, [table], expected)


# --------------------------------------------------------------------------- registry

LOCAL_SCENARIOS: dict[str, Callable[[Path], Outcome]] = {
    "subscriber_kill9": scenario_subscriber_kill9,
    "api_kill9": scenario_api_kill9,
    "broker_locked": scenario_broker_locked,
    "backpressure": scenario_backpressure,
    "duckdb_locked": scenario_duckdb_locked,
    "poison": scenario_poison,
    "idempotent_retries": scenario_idempotent_retries,
    "injection": scenario_injection,
}
GCP_SCENARIOS: dict[str, Callable[[Path], Outcome]] = {
    "pubsub_down": scenario_pubsub_down,
    "bigquery_down": scenario_bigquery_down,
    "bigquery_quota": scenario_bigquery_quota,
    "bigquery_rate_limit": lambda tmp: scenario_bigquery_quota(tmp, reason="rateLimitExceeded"),
    "bigquery_dml_queue": scenario_bigquery_dml_queue,
    "new_column_not_yet_visible": scenario_new_column_not_yet_visible,
    "lease_expiry": scenario_lease_expiry,
    "one_table_backlog": scenario_one_table_backlog,
}


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
