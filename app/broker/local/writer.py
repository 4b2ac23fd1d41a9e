"""The publish side of the local broker: a bounded queue and ONE group-commit writer thread.

The writer takes every request queued so far and commits them together in a single
``synchronous=FULL`` transaction (group commit): one fsync is shared by all concurrent
requests, and their rows go in as few statements as possible. A request that fails (a constraint, a
bad value) is refused alone: the group is then redone with one SAVEPOINT per request, and
the rest commits. If the group's transaction as a whole fails (disk full, I/O error, the
file is locked) every caller in it gets `BrokerUnavailable` and nothing of the group is
visible. The writer reconnects after any error, so it recovers by itself once the file is
writable again. The lock wait is short (at most 2 s, at most half the publish timeout),
so a file locked by another process answers `BrokerUnavailable` quickly; the queue is
bounded (requests and bytes) and answers `BrokerUnavailable` when full.

Requests reach the writer once per event-loop iteration, not one by one: a request is staged,
and the first one staged in an iteration schedules the hand-off (`loop.call_soon`), which moves
everything staged to the writer's queue with one wake-up. Handed over one by one, the writer
woke for the first request of a burst and committed it alone while the loop was still
validating the rest: at 32 connections two groups in three held one request (issue 20).

A request is *claimed* only once the writer holds the write lock; a caller whose publish
timeout fires before that gets `BrokerUnavailable` and its messages are never written.

Idempotency keys live in ``idempotency_keys`` and are checked and inserted in the same
transaction as the messages; they expire after 24 hours. When idle, the writer purges
expired keys, checkpoints the WAL and shrinks the file (incremental vacuum).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

from app.broker.base import BrokerUnavailable, IdempotencyConflict, OutgoingMessage, PublishResult
from app.broker.local import store

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0

# 4 parameters a row: 512 per statement, under SQLite's historical limit of 999. The
# writer's connection caches one prepared statement per chunk size (`_insert_sql`).
INSERT_ROWS_PER_STATEMENT = 128

_PENDING, _CLAIMED, _ABANDONED = 0, 1, 2
# Guards every PublishRequest.state change, between the writer and the callers' loops.
_CLAIM_LOCK = threading.Lock()


@functools.lru_cache(maxsize=INSERT_ROWS_PER_STATEMENT)
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?)"] * rows)
    return f"INSERT INTO messages (ordering_key, data, attributes, published_at) VALUES {values}"


class GroupFailed(Exception):
    """The group's transaction is gone: every caller in the group gets BrokerUnavailable."""


@dataclass(slots=True, eq=False)
class PublishRequest:
    """One `publish` call waiting in the queue; its answer goes back to its event loop."""

    rows: list[tuple[str, bytes, str]]  # (ordering_key, data, attributes JSON)
    batch_id: str
    idempotency_key: str | None
    fingerprint: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float  # time.monotonic()
    nbytes: int
    result: Any = field(default=None)  # PublishResult or an exception, set by the writer
    # _PENDING -> _CLAIMED (the writer holds the write lock and will commit it) or
    # _ABANDONED (the caller timed out first). Changed under `_CLAIM_LOCK` only, so a caller
    # that got "timed out" knows its messages were not, and will not be, published.
    state: int = _PENDING

    @classmethod
    def of(
        cls,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None,
        fingerprint: str | None,
        timeout: float,
    ) -> PublishRequest:
        rows: list[tuple[str, bytes, str]] = []
        nbytes = 0
        for m in messages:
            data = bytes(m.data)
            attributes = orjson.dumps(m.attributes).decode()
            rows.append((str(m.ordering_key), data, attributes))
            nbytes += len(data) + len(attributes) + len(m.ordering_key)
        loop = asyncio.get_running_loop()
        return cls(
            rows=rows,
            batch_id=batch_id,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            loop=loop,
            future=loop.create_future(),
            deadline=time.monotonic() + timeout,
            nbytes=nbytes,
        )

    def claim(self, now_mono: float) -> bool:
        """Writer side, holding the write lock: True if the caller still waits (then it is committed)."""
        with _CLAIM_LOCK:
            if self.state == _PENDING and self.deadline > now_mono:
                self.state = _CLAIMED
                return True
            self.state = _ABANDONED
        self.result = BrokerUnavailable("local broker publish timed out")
        return False

    def on_timeout(self, grace: float) -> None:
        """The caller's publish timeout (on its loop): give up unless the writer already claimed it."""
        if self.future.done():
            return
        with _CLAIM_LOCK:
            if self.state == _PENDING:
                self.state = _ABANDONED
        if self.state == _ABANDONED:
            self.future.set_exception(BrokerUnavailable("local broker publish timed out"))
        elif grace > 0:
            # Claimed: the commit holds the write lock and is only doing I/O; its outcome is
            # the answer. Still bound the wait in case the disk hangs (then it may be stored).
            self.loop.call_later(grace, self.on_timeout, 0.0)
        else:
            self.future.set_exception(BrokerUnavailable("local broker commit is hanging"))

    def settle(self) -> None:
        """On the caller's loop: hand the writer's result to the waiting `publish`."""
        if self.future.done():
            return
        if isinstance(self.result, BaseException):
            self.future.set_exception(self.result)
        else:
            self.future.set_result(self.result)


def _settle_all(requests: list[PublishRequest]) -> None:
    for request in requests:
        request.settle()


def resolve(group: list[PublishRequest]) -> None:
    """Hand results back to their event loops: one thread-safe call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[PublishRequest]] = {}
    for request in group:
        by_loop.setdefault(request.loop, []).append(request)
    for loop, requests in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, requests)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class GroupCommitWriter:
    """The bounded publish queue and the thread that commits it group by group."""

    # Queue bounds (backpressure: beyond them `publish` raises BrokerUnavailable).
    max_queued_requests = 20_000
    max_queued_bytes = 512 * 1024 * 1024
    # One group commit takes at most this much.
    max_group_requests = 4_000
    max_group_bytes = 64 * 1024 * 1024
    maintenance_interval_seconds = 60.0
    idempotency_purge_interval_seconds = 2.0
    idempotency_purge_chunk = 20_000

    def __init__(self, path: Path, *, publish_timeout: float) -> None:
        self.path = path
        self.publish_timeout = publish_timeout
        # Small busy timeout so a locked file answers quickly instead of hanging.
        self.busy_timeout = max(0.05, min(2.0, publish_timeout / 2))
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[PublishRequest] = collections.deque()
        # Staged by the callers' loops, not yet visible to the writer (guarded by `_cond`).
        self._staged: list[PublishRequest] = []
        # Loops with a hand-off scheduled (per loop: a loop closed early strands only itself).
        self._handoff_loops: set[asyncio.AbstractEventLoop] = set()
        self._queued_bytes = 0  # queued and staged
        self._conn: sqlite3.Connection | None = None
        self._last_maintenance = time.monotonic()
        self._last_purge = 0.0
        self._thread = threading.Thread(target=self._run, name="local-broker-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side
    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None,
        fingerprint: str | None,
    ) -> PublishResult:
        """Queue one request and wait for its group's commit (see `LocalBroker.publish`)."""
        request = PublishRequest.of(
            messages,
            batch_id=batch_id,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            timeout=self.publish_timeout,
        )
        self._enqueue(request)
        timer = request.loop.call_later(self.publish_timeout, request.on_timeout, self.publish_timeout)
        try:
            return await request.future
        finally:
            timer.cancel()

    def _enqueue(self, request: PublishRequest) -> None:
        """Stage the request; the loop hands the iteration's requests over together (`_hand_off`)."""
        with self._cond:
            if self._closed:
                raise BrokerUnavailable("local broker is closed")
            queued = len(self._queue) + len(self._staged)
            if queued and (
                queued >= self.max_queued_requests or self._queued_bytes + request.nbytes > self.max_queued_bytes
            ):
                raise BrokerUnavailable("local broker queue is full")
            self._staged.append(request)
            self._queued_bytes += request.nbytes
            if request.loop in self._handoff_loops:
                return
            self._handoff_loops.add(request.loop)
        request.loop.call_soon(self._hand_off, request.loop)

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        """On a caller's loop, after the requests of this iteration: make them the writer's."""
        with self._cond:
            self._handoff_loops.discard(loop)
            self._move_staged()

    def _move_staged(self) -> None:
        """Under `_cond`: the staged requests join the queue; wake the writer if it was empty."""
        if not self._staged:
            return
        was_empty = not self._queue
        self._queue.extend(self._staged)
        self._staged.clear()
        if was_empty:
            self._cond.notify()

    def close(self) -> None:
        """Refuse new publishes, commit the queued ones, stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._move_staged()  # staged requests are queued ones: they are committed too
            self._cond.notify_all()
        self._thread.join(timeout=self.publish_timeout + 5)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            group, stop = self._next_group()
            if stop:
                break
            try:
                if group is None:
                    self._maintain(idle=True)
                else:
                    self._commit_group(group)
                    self._maintain(idle=False)
            except Exception:  # never let the writer die
                log.exception("local broker writer error")
        self._close_conn()

    def _next_group(self) -> tuple[list[PublishRequest] | None, bool]:
        """Wait up to 1 s for requests; take as many as one group may hold.

        (None, False): idle; (None, True): closed and every queued request committed.
        """
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout=1.0)
            if not self._queue:
                return None, self._closed
            group: list[PublishRequest] = []
            size = 0
            while self._queue and len(group) < self.max_group_requests and size < self.max_group_bytes:
                request = self._queue.popleft()
                self._queued_bytes -= request.nbytes
                size += request.nbytes
                group.append(request)
            return group, False

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = store.connect(
                self.path,
                synchronous="FULL",
                busy_timeout=self.busy_timeout,
                cached_statements=2 * INSERT_ROWS_PER_STATEMENT,
                # It only appends, so it needs little beyond the indexes' right edges: 32 MiB
                # mostly kept written message pages (~15 MB more API RSS under 500-activity
                # batches); 4 MiB measured 10-20% fewer requests/s, 12 MiB no loss.
                cache_mib=12,
            )
            # Every write of this connection is inside `begin_immediate`, which polls for the
            # lock itself: without a busy handler the uncontended lock costs one statement.
            self._conn = store.without_busy_handler(conn)
        return self._conn

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        store.close_quietly(conn)

    def _commit_group(self, group: list[PublishRequest]) -> None:
        try:
            self._write_group(group)
        except Exception as exc:  # the whole group failed: nothing of it is committed
            log.warning("local broker group commit of %d requests failed: %s", len(group), exc)
            self._close_conn()
            for request in group:
                request.result = BrokerUnavailable(f"local broker commit failed: {exc}")
        resolve(group)

    def _write_group(self, group: list[PublishRequest]) -> None:
        conn = self._open_conn()
        store.begin_immediate(conn, self.busy_timeout)  # may wait up to the busy timeout for the write lock
        now = time.time()
        try:
            # Only now, holding the write lock, decide which callers are still waiting.
            now_mono = time.monotonic()
            claimed = [request for request in group if request.claim(now_mono)]
            if claimed:
                self._write_claimed(conn, claimed, now)
            conn.execute("COMMIT")  # also ends the group's savepoint
        except BaseException:
            store.rollback_quietly(conn)
            raise

    def _write_claimed(self, conn: sqlite3.Connection, claimed: list[PublishRequest], now: float) -> None:
        """All requests' rows together; if a statement fails, again with one savepoint per request.

        Each statement is a round trip that, in the API process, waits for the GIL while
        holding the write lock, so the group's rows go in together (up to 128 a statement).
        Only if a statement fails is the group redone request by request, so just the failing
        request is refused.
        """
        conn.execute("SAVEPOINT grp")
        try:
            self._write_together(conn, claimed, now)
        except sqlite3.Error as exc:
            if not conn.in_transaction:
                raise GroupFailed(f"transaction was rolled back by SQLite: {exc}") from exc
            conn.execute("ROLLBACK TO grp")
            for request in claimed:
                self._write_in_savepoint(conn, request, now)
        if not conn.in_transaction:
            raise GroupFailed("transaction was rolled back")

    def _write_together(self, conn: sqlite3.Connection, claimed: list[PublishRequest], now: float) -> None:
        rows: list[tuple[str, bytes, str, float]] = []
        for request in claimed:
            try:
                request.result = self._record_idempotency_key(conn, request, now)
            except IdempotencyConflict as exc:
                request.result = exc
                continue
            if request.result is None:
                rows.extend((k, d, a, now) for (k, d, a) in request.rows)
                request.result = PublishResult(batch_id=request.batch_id, message_count=len(request.rows))
        if rows:
            self._insert_rows(conn, rows)

    def _write_in_savepoint(self, conn: sqlite3.Connection, request: PublishRequest, now: float) -> None:
        """Store one request; if it fails, undo just its rows (the group goes on)."""
        conn.execute("SAVEPOINT req")
        try:
            request.result = self._write_request(conn, request, now)
        except IdempotencyConflict as exc:
            request.result = exc
            self._rollback_savepoint(conn)
        except sqlite3.Error as exc:
            self._rollback_savepoint(conn)
            request.result = BrokerUnavailable(f"local broker could not store the messages: {exc}")
        else:
            conn.execute("RELEASE req")

    @staticmethod
    def _rollback_savepoint(conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            raise GroupFailed("transaction was rolled back by SQLite")
        try:
            conn.execute("ROLLBACK TO req")
            conn.execute("RELEASE req")
        except sqlite3.Error as exc:
            raise GroupFailed(f"cannot roll back a failed request: {exc}") from exc
        if not conn.in_transaction:
            raise GroupFailed("transaction was rolled back by SQLite")

    def _write_request(self, conn: sqlite3.Connection, request: PublishRequest, now: float) -> PublishResult:
        duplicate = self._record_idempotency_key(conn, request, now)
        if duplicate is not None:
            return duplicate
        if request.rows:
            self._insert_rows(conn, [(k, d, a, now) for (k, d, a) in request.rows])
        return PublishResult(batch_id=request.batch_id, message_count=len(request.rows))

    @staticmethod
    def _record_idempotency_key(conn: sqlite3.Connection, request: PublishRequest, now: float) -> PublishResult | None:
        """The stored answer if the key was seen (same fingerprint); else record the key, None.

        Raises `IdempotencyConflict` when the key was used with another fingerprint.
        """
        key = request.idempotency_key
        if key is None:
            return None
        row = conn.execute(
            "SELECT batch_id, fingerprint, created_at FROM idempotency_keys WHERE key = ?", (key,)
        ).fetchone()
        if row is not None and row[2] >= now - IDEMPOTENCY_TTL_SECONDS:
            if row[1] == request.fingerprint:
                return PublishResult(batch_id=row[0], message_count=0, duplicate=True)
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was used with a different request")
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys (key, batch_id, fingerprint, created_at) VALUES (?, ?, ?, ?)",
            (key, request.batch_id, request.fingerprint, now),
        )
        return None

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[str, bytes, str, float]]) -> None:
        # Multi-row INSERTs, not executemany: sqlite3 gives the GIL away and waits for it
        # back once per executed row, and here that wait holds the write lock.
        for start in range(0, len(rows), INSERT_ROWS_PER_STATEMENT):
            chunk = rows[start : start + INSERT_ROWS_PER_STATEMENT]
            conn.execute(_insert_sql(len(chunk)), [value for row in chunk for value in row])

    # ------------------------------------------------------------------ maintenance
    def _maintain(self, *, idle: bool) -> None:
        """Purge expired idempotency keys; when idle, checkpoint the WAL and shrink the file."""
        if self._conn is None and not idle:
            return
        mono = time.monotonic()
        try:
            purge_every = self.maintenance_interval_seconds if idle else self.idempotency_purge_interval_seconds
            if mono - self._last_purge >= purge_every:
                self._last_purge = mono
                self._purge_idempotency_keys()
            if idle and mono - self._last_maintenance >= self.maintenance_interval_seconds:
                self._last_maintenance = mono
                self._shrink_file()
        except sqlite3.Error as exc:
            log.debug("local broker maintenance skipped: %s", exc)
            self._close_conn()

    def _purge_idempotency_keys(self) -> None:
        self._in_transaction(
            "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
            " WHERE created_at < ? LIMIT ?)",
            (time.time() - IDEMPOTENCY_TTL_SECONDS, self.idempotency_purge_chunk),
        )

    def _shrink_file(self) -> None:
        conn = self._open_conn()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        if free > 1024 and free * 4 > pages:
            self._in_transaction("PRAGMA incremental_vacuum")
        # A truncating checkpoint waits for readers; idle, the writer may wait for them.
        store.set_busy_timeout(conn, self.busy_timeout)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            store.set_busy_timeout(conn, 0)

    def _in_transaction(self, sql: str, params: tuple = ()) -> None:
        """One maintenance write; its connection has no busy handler, so take the lock by polling."""
        conn = self._open_conn()
        with store.immediate_transaction(conn, self.busy_timeout):
            conn.execute(sql, params).fetchall()
