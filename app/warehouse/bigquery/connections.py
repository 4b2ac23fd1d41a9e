"""A small bounded pool of Storage Write connections (AppendRows calls).

Google recommends a few long-lived connections shared by many tables, not one per table:
short-lived connections waste round trips, and the concurrent connections of a project
are a quota (https://cloud.google.com/bigquery/docs/write-api-best-practices#connection_pool_management,
https://cloud.google.com/bigquery/quotas#write-api-limits). Sharing one connection
among tables ("multiplexing") exists in the Java and Go clients only: the pinned Python
client's `AppendRowsStream` refuses a request for another stream than its first. So a
connection here serves one table at a time, and a table without an idle connection of
its own takes a free slot, or the least recently used idle connection (closed first),
or waits for one with the caller's deadline.

The pool's lock guards its bookkeeping only; opening, sending and closing happen outside it.
A connection being closed keeps its slot until its close returns, so a successor never
opens beside it and the bound holds at every moment, not only between calls.
Connections idle longer than `idle_seconds` are closed by a daemon reaper.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

from app.warehouse.base import TransientWarehouseError


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class Connection:
    """One slot of the pool: a connection bound to one stream while it lives."""

    stream_name: str
    stream: Closable | None = None  # created on first use by the writer
    writer_schema: bytes | None = None  # the schema the connection was opened with
    busy: bool = True
    last_used: float = field(default_factory=time.monotonic)


class ConnectionPool:
    def __init__(self, size: int, *, idle_seconds: float, close: Callable[[Closable], None]) -> None:
        if size < 1:
            raise ValueError("a connection pool needs at least one connection")
        self.size = size
        self.idle_seconds = idle_seconds
        self._close = close
        self._connections: list[Connection] = []  # idle ones in order of last use
        self._closing = 0  # connections out of the list whose close has not returned: still slots
        self._cond = threading.Condition()
        self._closed = False
        self._reaper: threading.Thread | None = None  # runs while connections are alive
        self.opened = 0  # connections handed out new (bench, tests)
        self.peak = 0  # most connections alive at once

    @property
    def alive(self) -> int:
        with self._cond:
            return len(self._connections)

    def _taken(self) -> int:
        return len(self._connections) + self._closing

    def acquire(self, stream_name: str, deadline: float) -> Connection:
        """A connection for `stream_name`, held until `release`/`discard`.

        Waits for a busy one to come back until `deadline` (`time.monotonic()`), then
        raises `TransientWarehouseError`.
        """
        evicted: Connection | None = None
        with self._cond:
            while True:
                if self._closed:
                    raise TransientWarehouseError("Storage Write connection pool is closed")
                idle = [c for c in self._connections if not c.busy]
                own = next((c for c in reversed(idle) if c.stream_name == stream_name), None)
                if own is not None:
                    own.busy = True
                    return own
                if self._taken() >= self.size and idle:
                    # its slot passes to us, and it is closed before we return (and open)
                    evicted = min(idle, key=lambda c: c.last_used)
                    self._connections.remove(evicted)
                if self._taken() < self.size:
                    conn = Connection(stream_name)
                    self._connections.append(conn)
                    self.opened += 1
                    self.peak = max(self.peak, self._taken())
                    if self._reaper is None:
                        self._reaper = threading.Thread(target=self._reap_idle, name="storage-write-reaper", daemon=True)
                        self._reaper.start()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransientWarehouseError(
                        f"no Storage Write connection free for {stream_name} ({self.size} in use)"
                    )
                self._cond.wait(remaining)
        if evicted is not None:
            self._close_stream(evicted)
        return conn

    def release(self, conn: Connection) -> None:
        """Give a healthy connection back for reuse."""
        with self._cond:
            conn.busy = False
            conn.last_used = time.monotonic()
            self._cond.notify_all()

    def discard(self, conn: Connection, closed: Future | None = None) -> None:
        """Drop a connection that failed (its answers may be out of step); closed outside the lock.

        `closed`, when given, is the close of a stream that cannot be closed yet (an open
        still waiting on the server): the slot stays taken until it is done.
        """
        with self._cond:
            if conn not in self._connections:
                return
            self._connections.remove(conn)
            self._closing += 1
        if closed is None:
            self._close_taken([conn])
        else:
            closed.add_done_callback(lambda _: self._free_slots(1))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            connections, self._connections = self._connections, []
            self._cond.notify_all()
        for conn in connections:
            self._close_stream(conn)

    def _close_taken(self, connections: list[Connection]) -> None:
        """Close connections counted in `_closing` (out of the list under the lock), then free their slots."""
        try:
            for conn in connections:
                self._close_stream(conn)
        finally:
            self._free_slots(len(connections))

    def _free_slots(self, count: int) -> None:
        if count:
            with self._cond:
                self._closing -= count
                self._cond.notify_all()

    def _close_stream(self, conn: Connection) -> None:
        stream, conn.stream = conn.stream, None
        if stream is not None:
            self._close(stream)

    def _reap_idle(self) -> None:
        while True:
            with self._cond:
                if self._closed or not self._connections:
                    self._reaper = None  # under the lock: the next acquire starts another
                    return
                self._cond.wait(max(self.idle_seconds / 2, 0.05))
                now = time.monotonic()
                stale = [c for c in self._connections if not c.busy and now - c.last_used >= self.idle_seconds]
                for conn in stale:
                    self._connections.remove(conn)
                self._closing += len(stale)
            self._close_taken(stale)
