"""The embedded default broker: one SQLite file shared by the API, the subscriber and the CLI.

Durability and concurrency
--------------------------
The file runs in WAL mode. The publisher connection uses ``synchronous=FULL`` so a
commit is fsynced before `publish` returns. Publishing goes through ONE writer thread
per `LocalBroker` that takes every request queued so far and commits them together in a
single transaction (group commit): one fsync is shared by all concurrent requests.
Each request runs inside its own SAVEPOINT, so a request that fails (a constraint, a bad
value) is rolled back alone while the rest of its group commits; if the group's
transaction as a whole fails (disk full, I/O error, the file is locked) every caller in it
gets `BrokerUnavailable` and nothing of the group is visible. The writer reconnects after
any error, so the broker recovers by itself once the file is writable again. The busy
timeout is small (at most 2 s, at most half the publish timeout), so a file locked by
another process answers `BrokerUnavailable` quickly; the queue is bounded (requests and
bytes) and answers `BrokerUnavailable` when full.

The subscriber side (pull/ack/nack) has its own connection with ``synchronous=NORMAL``:
losing a lease or an ack on power loss only causes a redelivery, which at-least-once
delivery allows and the warehouse's `dedup_id` absorbs.

Pub/Sub semantics
-----------------
* Every message row has ``not_before``: 0 for a fresh message, the lease expiry while it
  is leased, ``now + delay`` after a nack. A key is deliverable iff
  ``max(not_before) <= now`` over its messages (one index probe on
  ``(ordering_key, not_before)``), which blocks the key while any of its messages is leased
  or delayed and so keeps FIFO per key. Deliveries always start at the key's oldest
  message and take a consecutive run, so several messages of one key may come in one
  pull, in order.
* Keys are enumerated with a skip-scan over the ``(ordering_key, id)`` index, so a pull
  costs O(keys * log n), not O(n).
* The lease is taken inside ``BEGIN IMMEDIATE``, so several pullers (threads or
  processes) never get the same message while it is leased. Each pull draws a random
  lease token; `ack`/`nack` only touch rows still holding that token, so a stale ack
  after the lease expired and the message was re-leased is ignored.
* ``attempts`` counts deliveries; `ReceivedMessage.delivery_attempt` starts at 1.
  Dead-lettering after N attempts is the pipeline's decision.
* Acked messages are deleted; freed pages are reused, the WAL is truncated and the file
  shrunk (incremental vacuum) when the writer is idle.

Idempotency keys live in ``idempotency_keys`` and are checked and inserted in the same
transaction as the messages; they expire after 24 hours.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

from app.broker.base import (
    BacklogStats,
    Broker,
    BrokerUnavailable,
    IdempotencyConflict,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)
from app.settings import Settings

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: message ids stay unique
    ordering_key TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    attributes   TEXT    NOT NULL,                   -- JSON object of str -> str
    published_at REAL    NOT NULL,                   -- unix time of the commit
    not_before   REAL    NOT NULL DEFAULT 0,         -- lease expiry or nack delay, 0 = ready
    attempts     INTEGER NOT NULL DEFAULT 0,         -- deliveries so far
    lease_token  INTEGER                             -- token of the current lease, NULL if none
);
CREATE INDEX IF NOT EXISTS messages_key_id ON messages (ordering_key, id);
CREATE INDEX IF NOT EXISTS messages_key_not_before ON messages (ordering_key, not_before);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    batch_id    TEXT NOT NULL,
    fingerprint TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
"""

# Skip-scan over the ordering keys: per key its oldest message id and the largest
# not_before (> now means: leased or delayed, the key is blocked).
_KEYS_SQL = """
WITH RECURSIVE keys(k) AS (
    SELECT (SELECT min(ordering_key) FROM messages)
    UNION ALL
    SELECT (SELECT min(ordering_key) FROM messages WHERE ordering_key > keys.k)
    FROM keys WHERE keys.k IS NOT NULL
)
SELECT k,
       (SELECT min(id) FROM messages WHERE ordering_key = k),
       (SELECT max(not_before) FROM messages WHERE ordering_key = k)
FROM keys WHERE k IS NOT NULL
"""


class _GroupFailed(Exception):
    """The group's transaction is gone: every caller in the group gets BrokerUnavailable."""


@dataclass(slots=True, eq=False)
class _PublishRequest:
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
    state: int = 0


_PENDING, _CLAIMED, _ABANDONED = 0, 1, 2
_CLAIM_LOCK = threading.Lock()


READY_WRITE_WAIT_SECONDS = 1.0


class LocalBroker(Broker):
    """Durable SQLite-file broker with group commit; see the module docstring."""

    name = "local"

    # Writer queue bounds (backpressure: beyond them `publish` raises BrokerUnavailable).
    max_queued_requests = 20_000
    max_queued_bytes = 512 * 1024 * 1024
    # One group commit takes at most this much.
    max_group_requests = 4_000
    max_group_bytes = 64 * 1024 * 1024
    # One pull returns at most this many bytes of message data (at least one message).
    # Bounds the subscriber's memory: decoded activities take ~10x their JSON size, and
    # ~50 messages of 500 activities per pull already amortize the per-pull costs.
    max_pull_bytes = 4 * 1024 * 1024
    poll_interval_seconds = 0.02
    maintenance_interval_seconds = 60.0
    idempotency_purge_interval_seconds = 2.0
    idempotency_purge_chunk = 20_000

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path: Path = Path(settings.broker_file)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # reported by ready() / publish until it is fixed
            log.warning("cannot create %s: %s", self.path.parent, exc)
        self.ack_deadline = float(settings.ack_deadline_seconds)
        self.publish_timeout = float(settings.publish_timeout_seconds)
        # Small busy timeouts so a locked file answers quickly instead of hanging.
        self._writer_busy_timeout = max(0.05, min(2.0, self.publish_timeout / 2))
        self._sub_busy_timeout = 5.0

        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_PublishRequest] = collections.deque()
        self._queued_bytes = 0
        self._writer_conn: sqlite3.Connection | None = None
        self._last_maintenance = time.monotonic()
        self._last_purge = 0.0

        self._sub_lock = threading.RLock()
        self._sub_conn_: sqlite3.Connection | None = None
        self._tokens: dict[int, float] = {}  # lease tokens issued by this instance -> expiry
        self._last_pull_found = False  # skip the lock-free look while draining a backlog

        # Create the file and schema now if possible; if the file is unusable right now the
        # broker still starts (publish answers BrokerUnavailable, ready() says why).
        try:
            with self._sub_lock:
                self._sub_conn()
        except (sqlite3.Error, OSError) as exc:
            log.warning("local broker %s not usable yet: %s", self.path, exc)
            self._drop_sub_conn()

        self._writer = threading.Thread(target=self._writer_main, name="local-broker-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ connections
    def _connect(self, *, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._create_schema(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate a big WAL after checkpoints
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA cache_size = -32768")  # 32 MiB: index pages of a big backlog stay hot
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        # auto_vacuum must be chosen before the first table exists (no-op afterwards).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _sub_conn(self) -> sqlite3.Connection:
        if self._sub_conn_ is None:
            self._sub_conn_ = self._connect(synchronous="NORMAL", busy_timeout=self._sub_busy_timeout)
        return self._sub_conn_

    def _drop_sub_conn(self) -> None:
        conn, self._sub_conn_ = self._sub_conn_, None
        _close_quietly(conn)

    # ------------------------------------------------------------------ publish
    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> PublishResult:
        """Publish all messages in one fsynced transaction (shared with concurrent calls).

        Raises `BrokerUnavailable` when the queue is full, the commit fails, or the write lock
        could not be had within `publish_timeout_seconds`; in all these cases nothing of the
        call is stored (the writer claims a request only once it holds the write lock, and a
        claimed request's answer is its commit's outcome). Only if a claimed commit then hangs
        for another `publish_timeout_seconds` (a stuck disk) does the caller get
        `BrokerUnavailable` without that guarantee. `IdempotencyConflict` when the key was
        used with another fingerprint.
        """
        if not messages and idempotency_key is None:
            return PublishResult(batch_id=batch_id, message_count=0)
        rows: list[tuple[str, bytes, str]] = []
        nbytes = 0
        for m in messages:
            data = bytes(m.data)
            attributes = orjson.dumps(m.attributes).decode()
            rows.append((str(m.ordering_key), data, attributes))
            nbytes += len(data) + len(attributes) + len(m.ordering_key)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = _PublishRequest(
            rows=rows,
            batch_id=batch_id,
            idempotency_key=idempotency_key,
            fingerprint=request_fingerprint,
            loop=loop,
            future=future,
            deadline=time.monotonic() + self.publish_timeout,
            nbytes=nbytes,
        )
        with self._cond:
            if self._closed:
                raise BrokerUnavailable("local broker is closed")
            if self._queue and (
                len(self._queue) >= self.max_queued_requests or self._queued_bytes + nbytes > self.max_queued_bytes
            ):
                raise BrokerUnavailable("local broker queue is full")
            self._queue.append(request)
            self._queued_bytes += nbytes
            if len(self._queue) == 1:
                self._cond.notify()
        timer = loop.call_later(self.publish_timeout, _on_timeout, request, loop, self.publish_timeout)
        try:
            return await future
        finally:
            timer.cancel()

    # ------------------------------------------------------------------ writer thread
    def _writer_main(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(timeout=1.0)
                if not self._queue:
                    if self._closed:
                        break
                    group = None
                else:
                    group = []
                    size = 0
                    while self._queue and len(group) < self.max_group_requests and size < self.max_group_bytes:
                        request = self._queue.popleft()
                        self._queued_bytes -= request.nbytes
                        size += request.nbytes
                        group.append(request)
            try:
                if group is None:
                    self._maintenance(idle=True)
                else:
                    self._commit_group(group)
                    self._maintenance(idle=False)
            except Exception:  # never let the writer die
                log.exception("local broker writer error")
        self._close_writer_conn()

    def _close_writer_conn(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        _close_quietly(conn)

    def _commit_group(self, group: list[_PublishRequest]) -> None:
        claimed: list[_PublishRequest] = []
        try:
            self._write(group, claimed)
        except Exception as exc:  # the whole group failed: nothing of it is committed
            log.warning("local broker group commit of %d requests failed: %s", len(group), exc)
            self._close_writer_conn()
            for request in group:
                request.result = BrokerUnavailable(f"local broker commit failed: {exc}")
        _resolve(group)

    def _write(self, group: list[_PublishRequest], claimed: list[_PublishRequest]) -> None:
        if self._writer_conn is None:
            self._writer_conn = self._connect(synchronous="FULL", busy_timeout=self._writer_busy_timeout)
        conn = self._writer_conn
        _begin_immediate(conn, self._writer_busy_timeout)  # may wait up to the busy timeout for the write lock
        now = time.time()
        try:
            # Only now, holding the write lock, decide which callers are still waiting.
            now_mono = time.monotonic()
            with _CLAIM_LOCK:
                for request in group:
                    if request.state == _PENDING and request.deadline > now_mono:
                        request.state = _CLAIMED
                        claimed.append(request)
                    else:
                        request.state = _ABANDONED
                        request.result = BrokerUnavailable("local broker publish timed out")
            for request in claimed:
                conn.execute("SAVEPOINT req")
                try:
                    request.result = self._write_one(conn, request, now)
                except IdempotencyConflict as exc:
                    request.result = exc
                    self._rollback_savepoint(conn)
                except sqlite3.Error as exc:
                    # One request failed; undo just its rows if the transaction survived.
                    self._rollback_savepoint(conn)
                    request.result = BrokerUnavailable(f"local broker could not store the messages: {exc}")
                else:
                    conn.execute("RELEASE req")
            if not conn.in_transaction:
                raise _GroupFailed("transaction was rolled back")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    @staticmethod
    def _rollback_savepoint(conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            raise _GroupFailed("transaction was rolled back by SQLite")
        try:
            conn.execute("ROLLBACK TO req")
            conn.execute("RELEASE req")
        except sqlite3.Error as exc:
            raise _GroupFailed(f"cannot roll back a failed request: {exc}") from exc
        if not conn.in_transaction:
            raise _GroupFailed("transaction was rolled back by SQLite")

    @staticmethod
    def _write_one(conn: sqlite3.Connection, request: _PublishRequest, now: float) -> PublishResult:
        key = request.idempotency_key
        if key is not None:
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
        if request.rows:
            conn.executemany(
                "INSERT INTO messages (ordering_key, data, attributes, published_at) VALUES (?, ?, ?, ?)",
                [(k, d, a, now) for (k, d, a) in request.rows],
            )
        return PublishResult(batch_id=request.batch_id, message_count=len(request.rows))

    def _maintenance(self, *, idle: bool) -> None:
        """Purge expired idempotency keys; when idle, checkpoint the WAL and shrink the file."""
        if self._writer_conn is None and not idle:
            return
        mono = time.monotonic()
        try:
            purge_every = self.maintenance_interval_seconds if idle else self.idempotency_purge_interval_seconds
            if mono - self._last_purge >= purge_every:
                self._last_purge = mono
                conn = self._writer_conn or self._open_writer()
                conn.execute(
                    "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
                    " WHERE created_at < ? LIMIT ?)",
                    (time.time() - IDEMPOTENCY_TTL_SECONDS, self.idempotency_purge_chunk),
                )
            if idle and mono - self._last_maintenance >= self.maintenance_interval_seconds:
                self._last_maintenance = mono
                conn = self._writer_conn or self._open_writer()
                free, pages = (
                    conn.execute("PRAGMA freelist_count").fetchone()[0],
                    conn.execute("PRAGMA page_count").fetchone()[0],
                )
                if free > 1024 and free * 4 > pages:
                    conn.execute("PRAGMA incremental_vacuum")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("local broker maintenance skipped: %s", exc)
            self._close_writer_conn()

    def _open_writer(self) -> sqlite3.Connection:
        self._writer_conn = self._connect(synchronous="FULL", busy_timeout=self._writer_busy_timeout)
        return self._writer_conn

    # ------------------------------------------------------------------ subscriber side
    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        """Lease up to `max_messages` (FIFO per key), waiting up to `timeout` for the first."""
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            messages, next_due = self._try_lease(max_messages)
            if messages:
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return []
            pause = min(self.poll_interval_seconds, remaining)
            if next_due is not None:
                pause = min(pause, max(0.001, next_due - time.time()))
            time.sleep(pause)

    def _try_lease(self, max_messages: int) -> tuple[list[ReceivedMessage], float | None]:
        with self._sub_lock:
            if self._closed:
                return [], None
            try:
                conn = self._sub_conn()
                if not self._last_pull_found:
                    # Idle: look without taking the write lock first (publishers keep going).
                    ready, next_due = _deliverable_keys(conn, time.time())
                    if not ready:
                        return [], next_due
                _begin_immediate(conn, self._sub_busy_timeout)
                try:
                    messages = self._lease(conn, max_messages)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._drop_sub_conn()
                self._last_pull_found = False
                raise BrokerUnavailable(f"local broker pull failed: {exc}") from exc
            self._last_pull_found = bool(messages)
            return messages, None

    def _lease(self, conn: sqlite3.Connection, max_messages: int) -> list[ReceivedMessage]:
        now = time.time()
        keys, _ = _deliverable_keys(conn, now)
        if not keys:
            return []
        token = secrets.randbits(62)
        expiry = now + self.ack_deadline
        # Fair share first (oldest head first), then fill up from keys that had more.
        quota = max(1, -(-max_messages // len(keys)))
        taken: dict[str, list[ReceivedMessage]] = {}
        last_id: dict[str, int] = {}
        total = 0
        nbytes = 0
        full: list[str] = []
        for key, head in keys:
            if total >= max_messages or nbytes >= self.max_pull_bytes:
                break
            want = min(quota, max_messages - total)
            got, size = self._read_run(conn, key, head - 1, want, token, self.max_pull_bytes - nbytes, total == 0)
            if got:
                taken[key] = got
                last_id[key] = int(got[-1].message_id)
                total += len(got)
                nbytes += size
                if len(got) == want:
                    full.append(key)
        for key in full:
            if total >= max_messages or nbytes >= self.max_pull_bytes:
                break
            got, size = self._read_run(
                conn, key, last_id[key], max_messages - total, token, self.max_pull_bytes - nbytes, False
            )
            if got:
                taken[key].extend(got)
                last_id[key] = int(got[-1].message_id)
                total += len(got)
                nbytes += size
        result: list[ReceivedMessage] = []
        for key, got in taken.items():
            # The run is the first messages of the key, so a range update leases exactly them.
            conn.execute(
                "UPDATE messages SET not_before = ?, lease_token = ?, attempts = attempts + 1"
                " WHERE ordering_key = ? AND id BETWEEN ? AND ?",
                (expiry, token, key, int(got[0].message_id), last_id[key]),
            )
            result.extend(got)
        if result:
            self._remember_token(token, expiry)
        return result

    @staticmethod
    def _read_run(
        conn: sqlite3.Connection,
        key: str,
        after_id: int,
        limit: int,
        token: int,
        byte_budget: int,
        first: bool,
    ) -> tuple[list[ReceivedMessage], int]:
        got: list[ReceivedMessage] = []
        size = 0
        cursor = conn.execute(
            "SELECT id, data, attributes, attempts FROM messages WHERE ordering_key = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (key, after_id, limit),
        )
        for message_id, data, attributes, attempts in cursor:
            if size + len(data) > byte_budget and (got or not first):
                break
            size += len(data)
            got.append(
                ReceivedMessage(
                    message_id=str(message_id),
                    data=bytes(data),
                    attributes=orjson.loads(attributes),
                    ordering_key=key,
                    delivery_attempt=attempts + 1,
                    handle=(message_id, token),
                )
            )
        cursor.close()
        return got, size

    def _remember_token(self, token: int, expiry: float) -> None:
        now = time.time()
        if len(self._tokens) > 64:
            for t, e in list(self._tokens.items()):
                if e <= now:
                    del self._tokens[t]
        self._tokens[token] = expiry

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Delete the messages; a handle whose lease was taken over by another pull is ignored."""
        handles = _handles(messages)
        if not handles:
            return
        self._sub_write("DELETE FROM messages WHERE id = ? AND lease_token = ?", handles, "ack")

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Make the messages deliverable again after `delay_seconds` (their key waits too)."""
        handles = _handles(messages)
        if not handles:
            return
        when = time.time() + max(0.0, delay_seconds)
        self._sub_write(
            "UPDATE messages SET not_before = ?, lease_token = NULL WHERE id = ? AND lease_token = ?",
            [(when, i, t) for (i, t) in handles],
            "nack",
        )

    def _sub_write(self, sql: str, params: list[tuple], what: str) -> None:
        with self._sub_lock:
            try:
                conn = self._sub_conn()
                _begin_immediate(conn, self._sub_busy_timeout)
                try:
                    conn.executemany(sql, params)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._drop_sub_conn()
                raise BrokerUnavailable(f"local broker {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ both
    def ready(self) -> tuple[bool, str]:
        try:
            if not self.path.exists():
                return False, f"local broker file {self.path} does not exist"
            conn = sqlite3.connect(str(self.path), timeout=READY_WRITE_WAIT_SECONDS, isolation_level=None)
            try:
                conn.execute("SELECT count(*) FROM messages WHERE id = 0").fetchone()
                # Readable is not enough: a publish needs the write lock. Our own writer
                # holds it only for a commit at a time, so a short wait gets it.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return False, f"local broker file {self.path}: {exc}"
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            return False, f"local broker file {self.path} is not writable"
        return True, "ok"

    def backlog(self) -> BacklogStats | None:
        """Unacked messages (leased ones included) and the age of the oldest."""
        with self._sub_lock:
            try:
                conn = self._sub_conn()
                count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                row = conn.execute("SELECT published_at FROM messages ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                self._drop_sub_conn()
                raise BrokerUnavailable(f"local broker backlog failed: {exc}") from exc
        oldest = None if row is None else max(0.0, time.time() - row[0])
        return BacklogStats(messages=int(count), oldest_age_seconds=oldest)

    def close(self) -> None:
        """Finish queued publishes, give this instance's outstanding leases back, close."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join(timeout=self.publish_timeout + 5)
        with self._sub_lock:
            now = time.time()
            tokens = [(t,) for t, e in self._tokens.items() if e > now]
            self._tokens.clear()
            if tokens and self._sub_conn_ is not None:
                try:
                    conn = self._sub_conn_
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(
                        "UPDATE messages SET not_before = 0, lease_token = NULL WHERE lease_token = ?", tokens
                    )
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    log.debug("could not return leases on close: %s", exc)
            self._drop_sub_conn()


# ---------------------------------------------------------------------- helpers
_BUSY_RETRY_SECONDS = 0.0002


def _begin_immediate(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, retrying every 0.2 ms for up to `timeout` while another process writes.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... up to 100 ms between attempts, so a
    process waiting for the write lock while the API's writer commits group after group
    (each holding the lock for an fsync) starves for hundreds of milliseconds: the
    subscriber's lease and ack waited there for half of its time at a steady 3,400
    requests/s (docs/benchmarks.md). Polling finely finds the gaps between commits. The
    connection's busy timeout is off for this statement only and restored after.
    """
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(_BUSY_RETRY_SECONDS)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")


def _close_quietly(conn: sqlite3.Connection | None) -> None:
    """Closing a connection that already failed may fail again; it is being dropped anyway."""
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def _deliverable_keys(conn: sqlite3.Connection, now: float) -> tuple[list[tuple[str, int]], float | None]:
    """(key, head id) of keys that can deliver now, oldest head first; and when the next blocked key frees."""
    ready: list[tuple[str, int]] = []
    next_due: float | None = None
    for key, head, not_before in conn.execute(_KEYS_SQL):
        if head is None:
            continue
        if not_before <= now:
            ready.append((key, head))
        elif next_due is None or not_before < next_due:
            next_due = not_before
    ready.sort(key=lambda kh: kh[1])
    return ready, next_due


def _handles(messages: Sequence[ReceivedMessage]) -> list[tuple[int, int]]:
    out = []
    for m in messages:
        h = m.handle
        if isinstance(h, tuple) and len(h) == 2:
            out.append((int(h[0]), int(h[1])))
    return out


def _on_timeout(request: _PublishRequest, loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """The caller's publish timeout: give up unless the writer is already committing it."""
    if request.future.done():
        return
    with _CLAIM_LOCK:
        if request.state == _PENDING:
            request.state = _ABANDONED
    if request.state == _ABANDONED:
        request.future.set_exception(BrokerUnavailable("local broker publish timed out"))
    elif grace > 0:
        # Claimed: the commit holds the write lock and is only doing I/O; its outcome is
        # the answer. Still bound the wait in case the disk hangs (then it may be stored).
        loop.call_later(grace, _on_timeout, request, loop, 0.0)
    else:
        request.future.set_exception(BrokerUnavailable("local broker commit is hanging"))


def _resolve(group: list[_PublishRequest]) -> None:
    """Hand results back to their event loops: one thread-safe call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_PublishRequest]] = {}
    for request in group:
        by_loop.setdefault(request.loop, []).append(request)
    for loop, requests in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, requests)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(requests: list[_PublishRequest]) -> None:
    for request in requests:
        if request.future.done():
            continue
        if isinstance(request.result, BaseException):
            request.future.set_exception(request.result)
        else:
            request.future.set_result(request.result)
