"""CPU per ingest request inside the process: the ASGI app called directly, no sockets, no uvicorn.

Measures the main thread's CPU time (time.thread_time, so time lost to other processes
on a shared machine is not counted) per README-body request, best of several batches:

    .venv/bin/python -m scripts.bench.api_inprocess                 # stub broker: the app's own work
    .venv/bin/python -m scripts.bench.api_inprocess --broker local  # the real local broker, 32 concurrent
    .venv/bin/python -m scripts.bench.api_inprocess --activities 500  # README-shaped batches of 500
    .venv/bin/python -m scripts.bench.api_inprocess --frozen        # against a frozen, declared table

Lines go through the same JSON logging as the real API (into a temp file). Compare two
versions by running it from each tree's root alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from app.api.app import create_app
from app.logs import configure_logging
from app.runtime import freeze_startup_heap
from app.settings import Settings
from scripts.bench import workload
from tests.support.brokers import StubBroker  # accepts at once: only the API's own work is measured


# The README's table, declared and frozen: the contract check's cost (issue 18's 1.1x target).
FROZEN_README_TABLE = """
[defaults]
new_tables = "refuse"
contract = "freeze"

[tables.user_activities_table]
columns = {user_id = "integer", event_type_id = "integer", detail = "string", occured_at = "datetime"}
contract = "freeze"
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", choices=["stub", "local"], default="stub")
    p.add_argument("--level", default="INFO", help="LOG_LEVEL (WARNING: without the request line)")
    p.add_argument("--requests", type=int, default=1024, help="per batch")
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--activities", type=int, default=0, help="README-shaped activities per body (0: the README body)")
    p.add_argument("--frozen", action="store_true", help="TABLES_FILE declaring the README table, contract freeze")
    args = p.parse_args()

    configure_logging(args.level)
    logging.getLogger().handlers[0].setStream(tempfile.TemporaryFile("w"))
    body = workload.readme_batch(args.activities) if args.activities else workload.readme_body()
    data_dir = Path(tempfile.mkdtemp(prefix="api-inprocess-"))
    tables_file = None
    if args.frozen:
        tables_file = data_dir / "tables.toml"
        tables_file.write_text(FROZEN_README_TABLE)
    settings = Settings(data_dir=data_dir, tables_file=tables_file)
    app = create_app(settings, broker=StubBroker() if args.broker == "stub" else None)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api-log/v1/", "raw_path": b"/api-log/v1/", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }
    statuses: set[int] = set()
    freeze_startup_heap()  # as app.runtime.run_api does

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    concurrency = 1 if args.broker == "stub" else 32  # the local broker commits groups: keep it busy

    async def worker(n: int) -> None:
        for _ in range(n):
            await app(dict(scope), receive, send)

    async def run() -> float:
        per_worker = max(1, args.requests // concurrency)
        async with app.router.lifespan_context(app):
            await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))  # warm-up
            best = float("inf")
            for _ in range(args.batches):
                started = time.thread_time()
                await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
                best = min(best, (time.thread_time() - started) / (per_worker * concurrency))
        return best

    best = asyncio.run(run())
    assert statuses == {200}, statuses
    what = f"{args.activities} activities" if args.activities else "README body"
    print(f"{best * 1e6:.1f} us main-thread CPU per request of {what} (broker {args.broker}, log level {args.level}, "
          f"best of {args.batches} batches)")


if __name__ == "__main__":
    main()
