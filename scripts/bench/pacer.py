"""Open-loop paced load generator for the end-to-end latency test (a separate process).

Sends request i at t0 + i / rate over a pool of keep-alive connections (raw HTTP/1.1
on asyncio, so the client costs little CPU). Each body carries 2 activities of the
README's shape into table `bench_e2e` with user_id = i. Writes one JSON line per
request: [i, sent_monotonic, answered_monotonic, status] (CLOCK_MONOTONIC is shared
by all processes of the machine, so the caller can compare with its own clock).

usage: pacer.py PORT RATE SECONDS OUT_PATH [CONNECTIONS]
"""

import asyncio
import sys
import time

import orjson

TABLE = "bench_e2e"


def body(i: int) -> bytes:
    acts = [
        {"operation": "insert", "table": TABLE, "col_names": ["user_id", "event_type_id", "detail", "occured_at"],
         "col_types": ["integer", "integer", "string", "datetime"], "col_values": [i, k, "logged in", "2021-03-30 06:12:44"]}
        for k in (1, 2)
    ]
    return orjson.dumps({"user_activities": acts})


async def one(reader, writer, port: int, i: int) -> int:
    data = body(i)
    writer.write(
        b"POST /api-log/v1/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (port, len(data)) + data
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def main(port: int, rate: float, seconds: float, out_path: str, connections: int) -> None:
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    results: list = []
    total = int(rate * seconds)
    t0 = time.monotonic() + 0.2

    async def fire(i: int, sent: float) -> None:
        conn = await pool.get()
        try:
            status = await one(*conn, port, i)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status = -1
            conn = await asyncio.open_connection("127.0.0.1", port)
        results.append([i, sent, time.monotonic(), status])
        pool.put_nowait(conn)

    tasks = []
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, max(due, time.monotonic()))))
    await asyncio.gather(*tasks)
    with open(out_path, "wb") as f:
        for r in results:
            f.write(orjson.dumps(r) + b"\n")


if __name__ == "__main__":
    port, rate, seconds, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    conns = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    asyncio.run(main(port, rate, seconds, out, conns))
