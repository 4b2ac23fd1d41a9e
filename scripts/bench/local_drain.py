"""Micro-benchmark: per-message cost of the local broker's publish, pull and ack (not part of `make bench`).

Publishes N one-activity messages over K ordering keys (one request per message,
`--concurrency` at a time, the way the API does), then pulls and acks them all in pulls
of `--pull` messages. Prints microseconds per message for each phase and how many pulls
it took, and the SQL statements per pull (their tracing slows the pulls: `--no-count` for times).
No assertions: it prints numbers. `--profile PHASE` wraps one phase in cProfile.

usage: local_drain.py [--messages N] [--keys K] [--pull P] [--concurrency C] [--profile publish|drain] [--no-count]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.broker.base import OutgoingMessage  # noqa: E402
from app.broker.local.broker import LocalBroker  # noqa: E402
from app.settings import Settings  # noqa: E402

COUNT = "--no-count" not in sys.argv
if not COUNT:
    sys.argv.remove("--no-count")
ACTIVITY = b'{"activity":"page_view","user":"u-000001","ts":"2026-01-01T00:00:00Z","n":1}'


async def publish_all(broker: LocalBroker, messages: int, keys: int, concurrency: int) -> None:
    pending: set[asyncio.Task] = set()
    for i in range(messages):
        message = OutgoingMessage(data=ACTIVITY, attributes={"table": f"t{i % keys}"}, ordering_key=f"t{i % keys}")
        pending.add(asyncio.create_task(broker.publish([message], batch_id=f"b{i}")))
        if len(pending) >= concurrency:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*pending)


def drain(broker: LocalBroker, pull: int) -> tuple[int, float, float, int]:
    """(pulls, seconds pulling, seconds acking, SQL statements run by the pulls)."""
    pulls, pull_seconds, ack_seconds = 0, 0.0, 0.0
    statements = [0]
    conn = broker.leases._conn()

    last = [""]

    def count(sql: str) -> None:  # a trigger's statements are traced with their parent's text
        statements[0] += sql != last[0]
        last[0] = sql

    while True:
        conn.set_trace_callback(count if COUNT else None)
        started = time.perf_counter()
        got = broker.pull(pull, timeout=0.0)
        pull_seconds += time.perf_counter() - started
        conn.set_trace_callback(None)
        if not got:
            return pulls, pull_seconds, ack_seconds, statements[0]
        pulls += 1
        started = time.perf_counter()
        broker.ack(got)
        ack_seconds += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--pull", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", choices=["publish", "drain"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Settings(data_dir=Path(tmp), ack_deadline_seconds=60))
        profiler = cProfile.Profile()
        started = time.perf_counter()
        if args.profile == "publish":
            profiler.enable()
        asyncio.run(publish_all(broker, args.messages, args.keys, args.concurrency))
        profiler.disable()
        publish_seconds = time.perf_counter() - started
        if args.profile == "drain":
            profiler.enable()
        pulls, pull_seconds, ack_seconds, statements = drain(broker, args.pull)
        profiler.disable()
        broker.close()
    per = 1e6 / args.messages
    print(f"messages={args.messages} keys={args.keys} pulls={pulls} statements/pull={statements / max(1, pulls):.1f}")
    print(
        f"publish {publish_seconds * per:.1f} us/msg  pull {pull_seconds * per:.1f} us/msg"
        f" ({pull_seconds * 1e6 / max(1, pulls):.0f} us/pull)  ack {ack_seconds * per:.1f} us/msg"
    )
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
