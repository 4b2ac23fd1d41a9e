"""CPU per ingest request inside the process: the ASGI app called directly, no sockets, no uvicorn.

Measures the main thread's CPU time (time.thread_time, so time lost to other processes
on a shared machine is not counted) per README-body request, best of several batches:

    .venv/bin/python -m scripts.bench.api_inprocess                 # stub broker: the app's own work
    .venv/bin/python -m scripts.bench.api_inprocess --broker local  # the real local broker, 32 concurrent
    .venv/bin/python -m scripts.bench.api_inprocess --activities 500  # README-shaped batches of 500
    .venv/bin/python -m scripts.bench.api_inprocess --scoped  # + a scoped key and a traceparent, vs neither
    .venv/bin/python -m scripts.bench.api_inprocess --scoped --server  # the same through uvicorn's HTTP protocol
    .venv/bin/python -m scripts.bench.api_inprocess --frozen        # against a frozen, declared table
    .venv/bin/python -m scripts.bench.api_inprocess --contract  # + the table declared and frozen, vs no tables file

Lines go through the same JSON logging as the real API (into a temp file). Compare two
versions by running it from each tree's root alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from app.api.app import create_app
from app.keys import new_key, write_keys_file
from app.logs import configure_logging
from app.runtime import freeze_startup_heap
from app.settings import Settings
from scripts.bench import workload
from scripts.bench.inprocess_server import ServedConnection, raw_request
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
    p.add_argument("--scoped", action="store_true", help="also a scoped key and a traceparent; batches interleaved")
    p.add_argument("--frozen", action="store_true", help="TABLES_FILE declaring the README table, contract freeze")
    p.add_argument("--contract", action="store_true",
                   help="also the README table declared and frozen (TABLES_FILE) vs no tables file; batches interleaved")
    p.add_argument("--server", action="store_true",
                   help="whole requests: raw HTTP bytes through uvicorn's httptools protocol on uvloop, as the API runs")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight (default: 1 with the stub broker, 32 with the local one)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead (for `make bench`)")
    args = p.parse_args()
    if (args.scoped or args.contract) and args.broker != "stub":
        p.error("--scoped and --contract compare the app's own work: use them with the stub broker")
    if args.scoped and args.contract:
        p.error("one comparison at a time: --scoped or --contract")

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
    scoped_app, scoped_headers = (
        _scoped_app(settings) if args.scoped else _frozen_app(settings) if args.contract else (None, [])
    )
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

    # The local broker commits groups: keep it busy.
    concurrency = args.concurrency or (1 if args.broker == "stub" else 32)

    scoped_scope = {**scope, "headers": scope["headers"] + scoped_headers}

    async def worker(target, request_scope, n: int) -> None:
        if args.server:  # one keep-alive connection per worker, the request as a client sends it
            connection = ServedConnection(target)
            raw = raw_request(request_scope["path"], request_scope["headers"], body)
            for _ in range(n):
                statuses.add(int((await connection.request(raw)).split(b" ")[1]))
            return
        for _ in range(n):
            await target(dict(request_scope), receive, send)

    async def batch(target, request_scope, per_worker: int) -> float:
        started = time.thread_time()
        await asyncio.gather(*(worker(target, request_scope, per_worker) for _ in range(concurrency)))
        return (time.thread_time() - started) / (per_worker * concurrency)

    async def run() -> tuple[float, float, float]:
        """(best plain, best other, median over rounds of plain / other in the same round)."""
        per_worker = max(1, args.requests // concurrency)
        variants = [(app, scope)] + ([(scoped_app, scoped_scope)] if scoped_app is not None else [])
        rounds: list[list[float]] = []
        async with contextlib.AsyncExitStack() as stack:
            for target, request_scope in variants:
                await stack.enter_async_context(target.router.lifespan_context(target))
                await batch(target, request_scope, per_worker)  # warm-up
            for n in range(args.batches):  # interleaved, so both see the same machine; who goes first alternates
                order = list(enumerate(variants))[:: 1 if n % 2 == 0 else -1]
                times = [0.0] * len(variants)
                for i, (target, request_scope) in order:
                    times[i] = await batch(target, request_scope, per_worker)
                rounds.append(times)
        best = [min(r[i] for r in rounds) for i in range(len(variants))]
        return best[0], best[-1], statistics.median(r[0] / r[-1] for r in rounds)

    if args.server:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as `app.runtime.run_api`
            plain, scoped, paired = runner.run(run())
    else:
        plain, scoped, paired = asyncio.run(run())
    assert statuses == {200}, statuses
    if args.json:
        other = "frozen_us" if args.contract else "scoped_us"
        print(json.dumps({"plain_us": round(plain * 1e6, 2), other: round(scoped * 1e6, 2), "batches": args.batches,
                          "requests": args.requests, "server": args.server, "paired_ratio": round(paired, 4)}))
        return
    what = f"{args.activities} activities" if args.activities else "README body"
    what += " through uvicorn's protocol" if args.server else ""
    print(f"{plain * 1e6:.1f} us main-thread CPU per request of {what} (broker {args.broker}, log level {args.level}, "
          f"best of {args.batches} batches)")
    if args.scoped:
        print(f"{scoped * 1e6:.1f} us with a scoped key and a traceparent: {plain / scoped:.3f}x the throughput"
              f" of the best batches, {paired:.3f}x the median round (target >= 0.95x)")
    if args.contract:
        print(f"{scoped * 1e6:.1f} us against the table declared and frozen: {scoped / plain:.3f}x the cost"
              " (target <= 1.1x)")


def _frozen_app(settings: Settings):
    """An app whose tables file declares the README's table and freezes it (issue 18's speed target)."""
    data_dir = settings.data_dir / "contract"
    data_dir.mkdir()
    tables_file = data_dir / "tables.toml"
    tables_file.write_text(FROZEN_README_TABLE)
    return create_app(settings.model_copy(update={"tables_file": tables_file, "data_dir": data_dir}), broker=StubBroker()), []


def _scoped_app(settings: Settings):
    """An app whose requests carry a key scoped to the README's table, rate-limited, and a traceparent."""
    key, secret = new_key("bench", ["user_activities*"], ["insert"], rate=1e9)
    keys_file = settings.data_dir / "keys.toml"
    write_keys_file(keys_file, [key])
    scoped = settings.model_copy(update={"api_keys_file": keys_file, "data_dir": settings.data_dir / "scoped"})
    headers = [(b"authorization", f"Bearer {secret}".encode()),
               (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    return create_app(scoped, broker=StubBroker()), headers


if __name__ == "__main__":
    main()
