"""Micro-benchmark of the local broker's group-commit writer (not part of `make bench`).

Publishes N one-message requests concurrently from one asyncio loop, the way the API
does, optionally burning some Python CPU per request on that loop (the API's main
thread is busy, so the writer thread waits for the GIL after every SQLite call), and
optionally with a subscriber process that leases and acks all the while. Counts group
commits, the writer's write-lock attempts and busy retries (`store.begin_immediate`),
and the subscriber's waits for the write lock. No assertions: it prints numbers.

usage: local_writer.py [--requests N] [--concurrency C] [--cpu-us U] [--subscriber]
                       [--count-statements] [--tree PATH]   (measure another checkout's `app/`, e.g. a git archive)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class LockWaits:
    """Wraps `store.begin_immediate` and the store's clock: calls, seconds and busy retries per thread."""

    def __init__(self, store_module) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.worst: dict[str, float] = {}
        self.retries: dict[str, int] = {}
        real_begin, real_time = store_module.begin_immediate, store_module.time
        waits = self

        class CountingTime:
            """The store sleeps only between busy retries of BEGIN IMMEDIATE."""

            monotonic = staticmethod(real_time.monotonic)
            time = staticmethod(real_time.time)

            @staticmethod
            def sleep(seconds: float) -> None:
                name = threading.current_thread().name
                waits.retries[name] = waits.retries.get(name, 0) + 1
                real_time.sleep(seconds)

        def begin_immediate(conn, timeout, **kw):
            name = threading.current_thread().name
            started = time.perf_counter()
            try:
                return real_begin(conn, timeout, **kw)
            finally:
                took = time.perf_counter() - started
                self.calls[name] = self.calls.get(name, 0) + 1
                self.seconds[name] = self.seconds.get(name, 0.0) + took
                self.worst[name] = max(self.worst.get(name, 0.0), took)

        store_module.time = CountingTime()
        store_module.begin_immediate = begin_immediate

    def report(self, name: str) -> dict[str, float]:
        calls = self.calls.get(name, 0)
        return {
            "lock_takes": calls,
            "busy_retries": self.retries.get(name, 0),
            "mean_take_us": round(1e6 * self.seconds.get(name, 0.0) / max(1, calls), 1),
            "worst_take_ms": round(1e3 * self.worst.get(name, 0.0), 2),
        }


def count_writer_statements(store_module) -> list[int]:
    """Count the SQL statements the writer thread runs (each one gives the GIL away and waits for it back)."""
    count = [0]
    real_connect = store_module.connect

    def connect(*args, **kw):
        conn = real_connect(*args, **kw)
        if threading.current_thread().name == "local-broker-writer":

            def trace(statement: str) -> None:
                count[0] += 1

            conn.set_trace_callback(trace)
        return conn

    store_module.connect = connect
    return count


def burn(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def run_publisher(args: argparse.Namespace, data_dir: Path) -> dict:
    from app.broker.base import OutgoingMessage
    from app.broker.local import LocalBroker, store
    from app.broker.local.writer import GroupCommitWriter
    from app.settings import Settings

    waits = LockWaits(store)
    statements = count_writer_statements(store) if args.count_statements else None
    groups = [0]
    writer_cpu = [0.0]  # the writer thread's CPU time in group commits (Python and SQLite, not waits)
    real_commit = GroupCommitWriter._commit_group

    def counting_commit(self, group):
        groups[0] += 1
        started = time.thread_time()
        try:
            return real_commit(self, group)
        finally:
            writer_cpu[0] += time.thread_time() - started

    GroupCommitWriter._commit_group = counting_commit
    broker = LocalBroker(Settings(data_dir=data_dir))
    payload = b'{"v":1,"activities":[' + b'{"user_id":1,"detail":"logged in"},' * 6 + b"{}]}"
    per_worker = args.requests // args.concurrency

    async def worker(w: int) -> None:
        for j in range(per_worker):
            burn(args.cpu_us)
            key = f"table{j % 4}"
            message = OutgoingMessage(payload, key, {"dedup_id": f"{w}-{j}", "table": key})
            await broker.publish([message], batch_id=f"{w}-{j}")

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(args.concurrency)])
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    broker.close()
    total = per_worker * args.concurrency
    return {
        "requests": total,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(total / elapsed),
        "group_commits_per_s": round(groups[0] / elapsed),
        "requests_per_group": round(total / max(1, groups[0]), 1),
        "writer_cpu_us_per_request": round(1e6 * writer_cpu[0] / total, 1),
        "writer": waits.report("local-broker-writer"),
        **({"writer_statements_per_group": round(statements[0] / max(1, groups[0]), 1)} if statements else {}),
    }


def run_subscriber(data_dir: Path, stop_file: Path) -> dict:
    from app.broker.local import LocalBroker, store
    from app.settings import Settings

    waits = LockWaits(store)
    broker = LocalBroker(Settings(data_dir=data_dir))
    acked = 0
    while not stop_file.exists():
        got = broker.pull(100, timeout=0.05)
        broker.ack(got)
        acked += len(got)
    broker.close()
    return {"acked": acked, **waits.report("MainThread")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cpu-us", type=float, default=0.0, help="Python CPU burnt per request on the loop")
    parser.add_argument("--subscriber", action="store_true", help="lease and ack from a second process meanwhile")
    parser.add_argument("--count-statements", action="store_true", help="trace the writer's statements (slower)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose app/ is measured")
    parser.add_argument("--subscriber-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    if args.subscriber_of:
        print(json.dumps(run_subscriber(args.subscriber_of, args.subscriber_of / "stop")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        sub = None
        if args.subscriber:
            argv = [sys.executable, __file__, "--tree", str(args.tree), "--subscriber-of", str(data_dir)]
            sub = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""})
            time.sleep(1.0)  # let it open the file
        result = run_publisher(args, data_dir)
        if sub is not None:
            (data_dir / "stop").touch()
            out, _ = sub.communicate(timeout=60)
            result["subscriber"] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"cpu_us_per_request": args.cpu_us, "concurrency": args.concurrency, **result}, indent=1))


if __name__ == "__main__":
    main()
