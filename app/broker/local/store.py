"""The broker's SQLite file: schema, connections, taking the write lock, deliverable keys.

Every message row has ``not_before``: 0 for a fresh message, the lease expiry while it is
leased, ``now + delay`` after a nack. A key is deliverable iff ``max(not_before) <= now``
over its messages (one index probe on ``(ordering_key, not_before)``), which blocks the key
while any of its messages is leased or delayed and so keeps FIFO per key. Keys are
enumerated with a skip-scan over the ``(ordering_key, id)`` index, so finding them costs
O(keys * log n), not O(n).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Iterator
from pathlib import Path

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

BUSY_RETRY_SECONDS = 0.0002


def connect(
    path: Path, *, synchronous: str, busy_timeout: float, cached_statements: int = 128, cache_mib: int = 32
) -> sqlite3.Connection:
    """Open the file in WAL mode (creating the schema if needed), autocommit, any thread.

    `cache_mib`: SQLite's page cache per connection (each role sets its own).
    """
    conn = sqlite3.connect(
        str(path),
        timeout=busy_timeout,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=cached_statements,
    )
    try:
        set_busy_timeout(conn, busy_timeout)
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            create_schema(conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate a big WAL after checkpoints
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_mib)}")  # negative: KiB
    except BaseException:
        conn.close()
        raise
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
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


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection, timeout: float, *, busy_timeout: float | None = None) -> Iterator[None]:
    """`begin_immediate`, then COMMIT if the block succeeds, else ROLLBACK (if still open) and re-raise."""
    begin_immediate(conn, timeout, busy_timeout=busy_timeout)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)  # never mask the error that ended the block
        raise


def begin_immediate(conn: sqlite3.Connection, timeout: float, *, busy_timeout: float | None = None) -> None:
    """BEGIN IMMEDIATE, retrying every 0.2 ms for up to `timeout` while another connection writes.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... up to 100 ms between attempts, so a
    process waiting for the write lock while the API's writer commits group after group
    (each holding the lock for an fsync) starves for hundreds of milliseconds: the
    subscriber's lease and ack waited there for half of its time at a steady 3,400
    requests/s (docs/benchmarks.md). Polling finely finds the gaps between commits.

    The busy handler must be off while polling. The writer's connection never has one
    (`without_busy_handler`), so an uncontended lock costs one statement; a connection
    that keeps one for its reads passes it as `busy_timeout`: it is switched off for
    this call and restored after (two more statements).
    """
    if busy_timeout is not None:
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
            time.sleep(BUSY_RETRY_SECONDS)
    finally:
        if busy_timeout is not None:
            set_busy_timeout(conn, busy_timeout)


def set_busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")


def without_busy_handler(conn: sqlite3.Connection) -> sqlite3.Connection:
    """For a connection that takes the write lock only through `begin_immediate` (the writer's)."""
    set_busy_timeout(conn, 0)
    return conn


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """End a failed transaction; if even that fails the connection is dropped by the caller."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def close_quietly(conn: sqlite3.Connection | None) -> None:
    """Closing a connection that already failed may fail again; it is being dropped anyway."""
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def deliverable_keys(conn: sqlite3.Connection, now: float) -> tuple[list[tuple[str, int]], float | None]:
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
