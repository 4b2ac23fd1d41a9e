"""bqemulator's command line, run by the emulator's own venv (`tests/support/bqemulator.py`),
with room for as many open streams as Google allows.

bqemulator runs its Storage Write handlers as sync gRPC handlers on grpc.aio's thread pool,
which defaults to `min(32, CPUs + 4)` threads: 6 on a 2-CPU machine. An open AppendRows call
keeps its thread for its whole life, so a 7th open connection (an app with more than ~5 pooled
connections) left every later call waiting for a thread until a client deadline closed one.
Google's limit is a quota of thousands of connections
(https://cloud.google.com/bigquery/quotas#write-api-limits), so the harness gives the
emulator a pool of its own size. Nothing else of the emulator changes.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import grpc.aio

HANDLER_THREADS = 128

_server = grpc.aio.server


def _server_with_threads(*args, **kwargs):
    if kwargs.get("migration_thread_pool") is None and not args:
        kwargs["migration_thread_pool"] = ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="bqemu-rpc")
    return _server(*args, **kwargs)


grpc.aio.server = _server_with_threads

if __name__ == "__main__":
    from bqemulator.cli import main

    sys.argv[0] = "bqemulator"
    sys.exit(main())
