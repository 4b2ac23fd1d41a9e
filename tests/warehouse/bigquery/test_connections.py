"""The Storage Write connection pool and the open deadline (app/warehouse/bigquery/connections.py,
writer.py). No emulator: fake streams stand in for `AppendRowsStream`."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from app.warehouse.base import TransientWarehouseError
from app.warehouse.bigquery.connections import ConnectionPool
from app.warehouse.bigquery.writer import OpenPastDeadline, _open_within
from tests.support.processes import wait_until

FAR = 3600.0  # a deadline no test reaches


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def pool_of(size: int, idle_seconds: float = FAR) -> tuple[ConnectionPool, list[FakeStream]]:
    closed: list[FakeStream] = []

    def close(stream: FakeStream) -> None:
        stream.close()
        closed.append(stream)

    return ConnectionPool(size, idle_seconds=idle_seconds, close=close), closed


def take(pool: ConnectionPool, name: str):
    conn = pool.acquire(name, time.monotonic() + FAR)
    if conn.stream is None:
        conn.stream = FakeStream(name)
    return conn


def test_a_table_reuses_its_idle_connection() -> None:
    pool, closed = pool_of(2)
    first = take(pool, "a")
    pool.release(first)
    again = take(pool, "a")
    assert again is first and pool.opened == 1 and closed == []
    pool.close()


def test_more_tables_than_connections_evict_the_least_recently_used_idle_one() -> None:
    pool, closed = pool_of(2)
    a, b = take(pool, "a"), take(pool, "b")
    a_stream = a.stream
    pool.release(a)
    pool.release(b)
    c = take(pool, "c")  # a was idle longest: closed to make room
    assert closed == [a_stream] and pool.alive == 2 and c.stream_name == "c"
    assert pool.peak == 2
    pool.close()


def test_a_table_waits_for_a_busy_pool_only_until_its_deadline() -> None:
    pool, _ = pool_of(1)
    held = take(pool, "a")
    with pytest.raises(TransientWarehouseError, match="no Storage Write connection free"):
        pool.acquire("b", time.monotonic())
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("b", time.monotonic() + FAR)))
    waiter.start()
    pool.release(held)  # the waiting table gets the slot (the idle connection of a is closed)
    waiter.join(timeout=FAR)
    assert [c.stream_name for c in got] == ["b"] and pool.alive == 1
    pool.close()


def test_a_failed_connection_is_closed_and_its_slot_freed() -> None:
    pool, closed = pool_of(1)
    conn = take(pool, "a")
    stream = conn.stream
    pool.discard(conn)
    assert closed == [stream] and pool.alive == 0
    assert take(pool, "a") is not conn
    pool.close()


def test_idle_connections_are_closed() -> None:
    pool, closed = pool_of(2, idle_seconds=0.05)
    conn = take(pool, "a")
    stream = conn.stream
    pool.release(conn)
    wait_until(lambda: closed == [stream], timeout=10, what="the idle connection to close")
    assert pool.alive == 0
    pool.release(take(pool, "b"))  # the pool works on after its reaper stopped
    wait_until(lambda: len(closed) == 2, timeout=10, what="the second idle connection to close")
    pool.close()


class HangingOpen:
    """An `AppendRowsStream` whose first send (the open) waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()

    def send(self, request):
        self.release.wait()
        return "future"

    def close(self) -> None:
        self.closed.set()


def test_an_open_past_our_deadline_is_a_transient_error_and_the_stream_is_closed_later() -> None:
    stream = HangingOpen()
    with pytest.raises(TransientWarehouseError, match="no connection within our deadline"):
        _open_within(stream, object(), time.monotonic(), what="opening AppendRows to t")  # type: ignore[arg-type]
    assert not stream.closed.is_set()  # never closed under the library's own open lock
    stream.release.set()
    assert stream.closed.wait(FAR)


def test_an_open_within_the_deadline_hands_back_the_first_answer() -> None:
    stream = HangingOpen()
    stream.release.set()
    assert _open_within(stream, object(), time.monotonic() + FAR, what="open") == "future"  # type: ignore[arg-type]
    assert not stream.closed.is_set()


def test_a_discarded_connection_keeps_its_slot_until_its_close_returns() -> None:
    closing, may_return = threading.Event(), threading.Event()

    def slow_close(stream: FakeStream) -> None:
        closing.set()
        may_return.wait()

    pool = ConnectionPool(1, idle_seconds=FAR, close=slow_close)
    conn = take(pool, "a")
    discarding = threading.Thread(target=pool.discard, args=(conn,))
    discarding.start()
    assert closing.wait(FAR)
    with pytest.raises(TransientWarehouseError, match="no Storage Write connection free"):
        pool.acquire("b", time.monotonic())  # the server may still count the old connection
    may_return.set()
    discarding.join(FAR)
    assert take(pool, "b").stream_name == "b" and pool.peak == 1
    pool.close()


def test_an_open_past_our_deadline_keeps_its_slot_until_the_stream_is_closed() -> None:
    pool, _ = pool_of(1)
    conn = pool.acquire("a", time.monotonic() + FAR)  # its open hangs: no stream yet
    closed: Future = Future()
    pool.discard(conn, closed=closed)
    with pytest.raises(TransientWarehouseError, match="no Storage Write connection free"):
        pool.acquire("b", time.monotonic())
    closed.set_result(None)  # the open returned, and the stream was closed
    assert take(pool, "b").stream_name == "b"
    pool.close()


def test_the_writer_hands_the_pool_the_close_of_an_open_past_its_deadline() -> None:
    stream = HangingOpen()
    with pytest.raises(OpenPastDeadline) as raised:
        _open_within(stream, object(), time.monotonic(), what="opening AppendRows to t")  # type: ignore[arg-type]
    assert not raised.value.closed.done()
    stream.release.set()
    raised.value.closed.result(timeout=FAR)
    assert stream.closed.is_set()
