"""Fault scenarios of the embedded default: SQLite broker, DuckDB warehouse, the processes killed or locked out."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import httpx

from tests.support.faults.harness import (
    TRANSPORT_ERRORS,
    activity,
    post_until_accepted,
    rows_body,
    start_pipeline,
    status_of,
)
from tests.support.faults.outcome import (
    Outcome,
    backlog,
    dead_letters,
    marker_counts,
    retry_delays,
    rss_bytes,
    timed,
    try_query,
    wait_backlog_empty,
)
from tests.support.processes import wait_until


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


# --------------------------------------------------------------------------- 1. subscriber kill -9


@timed
def scenario_subscriber_kill9(
    tmp: Path, total: int = 100_000, per_request: int = 500, kills: int = 10, seed: int = 11
) -> Outcome:
    """kill -9 the subscriber at random points `kills` times while `total` activities stream in."""
    out = Outcome("subscriber kill -9", f"subscriber SIGKILLed {kills}x at random points during a {total:,}-row stream")
    p = start_pipeline(tmp, ACK_DEADLINE_SECONDS="2")
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


@timed
def scenario_api_kill9(
    tmp: Path, clients: int = 6, min_batches_per_client: int = 20, rows: int = 100, kills: int = 5, seed: int = 5
) -> Outcome:
    """kill -9 the API under concurrent load; each batch spans two tables and carries a marker."""
    out = Outcome("API kill -9", f"API SIGKILLed {kills}x under {clients} concurrent clients")
    p = start_pipeline(tmp)
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


@timed
def scenario_broker_locked(tmp: Path, requests: int = 6, publish_timeout: float = 2.0) -> Outcome:
    """Another process holds the local broker's SQLite write lock (BEGIN EXCLUSIVE)."""
    out = Outcome("local broker locked", "another process holds BEGIN EXCLUSIVE on broker.sqlite")
    p = start_pipeline(tmp, PUBLISH_TIMEOUT_SECONDS=str(publish_timeout))
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


@timed
def scenario_backpressure(
    tmp: Path, concurrency: int = 150, waves: int = 3, activities_per_request: int = 200, publish_timeout: float = 2.0
) -> Outcome:
    """Commits stall (write lock held) while bursts of concurrent requests arrive."""
    out = Outcome("backpressure", f"broker commits stalled; {waves} waves of {concurrency} concurrent requests")
    p = start_pipeline(tmp, PUBLISH_TIMEOUT_SECONDS=str(publish_timeout))
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


@timed
def scenario_duckdb_locked(tmp: Path, batches: int = 5, backoff_max: float = 1.0, min_retries: int = 7) -> Outcome:
    """Another process holds the DuckDB file read-write while batches arrive."""
    out = Outcome("DuckDB locked", "another process holds warehouse.duckdb open read-write")
    p = start_pipeline(tmp, RETRY_BACKOFF_MAX_SECONDS=str(backoff_max), ACK_DEADLINE_SECONDS="5")
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


@timed
def scenario_poison(tmp: Path, max_attempts: int = 3, flow_batches: int = 6) -> Outcome:
    """Undecodable bytes and a never-applying message published into the broker, a type conflict via the API."""
    from app.broker.base import OutgoingMessage
    from app.broker.local import LocalBroker
    from app.settings import Settings

    out = Outcome("poison messages", "garbage bytes + a message DuckDB can never apply + a type conflict")
    p = start_pipeline(tmp, MAX_DELIVERY_ATTEMPTS=str(max_attempts))
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


@timed
def scenario_idempotent_retries(tmp: Path, batches: int = 30, rows: int = 20, kills: int = 2, seed: int = 3) -> Outcome:
    """Clients retry every batch with its Idempotency-Key across API kills; plus a re-published chunk."""
    from app.broker.local import LocalBroker
    from app.messages.codec import encode_batch
    from app.schema.validation import validate_batch
    from app.settings import Settings

    out = Outcome("idempotent retries", f"each batch retried with the same Idempotency-Key; API SIGKILLed {kills}x")
    p = start_pipeline(tmp)
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


@timed
def scenario_injection(tmp: Path) -> Outcome:
    """Hostile identifiers (must be 422 naming the field) and values (stored literally)."""
    out = Outcome("SQL injection", "identifiers and values carrying quotes, ;, comments, look-alikes, long text")
    p = start_pipeline(tmp)
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
