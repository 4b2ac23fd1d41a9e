"""The broker's SQLite file: schema (and its migration), connections, the write lock, deliverable keys.

A message row is written once by the publisher and deleted once on ack; delivery state
lives in ``leases`` (one row per message delivered at least once), so leasing never
rewrites a message's body. A lease row's ``not_before`` is the lease expiry while leased,
``now + delay`` after a nack. A key is deliverable iff no lease row of it has
``not_before > now``, which blocks the key while any of its messages is leased or delayed
and so keeps FIFO per key.

``key_heads`` holds one row per key with messages: its oldest message and the largest
``not_before`` of its leases (0: none). Triggers keep it in the same transaction as the
rows it summarizes, so it is as crash-safe as they are. Finding the deliverable keys is
then an index range on ``(blocked_until, head_id)`` with a LIMIT: a pull's cost does not
grow with the number of keys that have nothing to deliver.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Iterator
from pathlib import Path

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: message ids stay unique
    ordering_key TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    attributes   TEXT    NOT NULL,                   -- JSON object of str -> str
    published_at REAL    NOT NULL                    -- unix time of the commit
);
CREATE INDEX IF NOT EXISTS messages_key_id ON messages (ordering_key, id);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    batch_id    TEXT NOT NULL,
    fingerprint TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
"""

_LEASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    message_id   INTEGER PRIMARY KEY,                -- messages.id, deleted with it on ack
    ordering_key TEXT    NOT NULL,                   -- the message's, to block its key
    not_before   REAL    NOT NULL,                   -- lease expiry or nack delay
    attempts     INTEGER NOT NULL,                   -- deliveries so far
    lease_token  INTEGER                             -- token of the current lease, NULL if none
);
CREATE INDEX IF NOT EXISTS leases_key_not_before ON leases (ordering_key, not_before);
"""

# Version 1 kept the delivery state in the message row; move it to `leases`. Its
# columns stay in `messages` (dropping them rewrites the table) with their defaults.
_MIGRATE_FROM_1 = _LEASES_SCHEMA + """
INSERT INTO leases (message_id, ordering_key, not_before, attempts, lease_token)
    SELECT id, ordering_key, not_before, attempts, lease_token FROM messages
    WHERE attempts > 0 OR not_before > 0 OR lease_token IS NOT NULL;
DROP INDEX IF EXISTS messages_key_not_before;
"""

# Version 3: per key, its head and when it unblocks, kept by triggers (see the docstring).
# Any lease change recomputes its key's max(not_before) (a probe of leases_key_not_before)
# and rewrites the key's row only if it changed (an ack of a run: once, not per message).
_KEY_HEADS_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_heads (
    ordering_key  TEXT    PRIMARY KEY,
    head_id       INTEGER NOT NULL,                  -- the key's oldest message
    blocked_until REAL    NOT NULL                   -- max not_before of its leases, 0 if none
);
CREATE INDEX IF NOT EXISTS key_heads_blocked_head ON key_heads (blocked_until, head_id);
CREATE TRIGGER IF NOT EXISTS key_heads_on_publish AFTER INSERT ON messages BEGIN
    INSERT INTO key_heads (ordering_key, head_id, blocked_until) VALUES (new.ordering_key, new.id, 0)
    ON CONFLICT (ordering_key) DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS key_heads_on_delete AFTER DELETE ON messages
WHEN old.id = (SELECT head_id FROM key_heads WHERE ordering_key = old.ordering_key) BEGIN
    DELETE FROM key_heads WHERE ordering_key = old.ordering_key
        AND NOT EXISTS (SELECT 1 FROM messages WHERE ordering_key = old.ordering_key);
    UPDATE key_heads SET head_id = (SELECT min(id) FROM messages WHERE ordering_key = old.ordering_key)
        WHERE ordering_key = old.ordering_key;
END;
CREATE TRIGGER IF NOT EXISTS key_heads_on_lease AFTER INSERT ON leases BEGIN
    UPDATE key_heads SET blocked_until = max(blocked_until, new.not_before) WHERE ordering_key = new.ordering_key;
END;
CREATE TRIGGER IF NOT EXISTS key_heads_on_lease_update AFTER UPDATE OF not_before ON leases BEGIN
    UPDATE key_heads SET blocked_until = coalesce(
            (SELECT max(not_before) FROM leases WHERE ordering_key = new.ordering_key), 0)
        WHERE ordering_key = new.ordering_key AND blocked_until IS NOT coalesce(
            (SELECT max(not_before) FROM leases WHERE ordering_key = new.ordering_key), 0);
END;
CREATE TRIGGER IF NOT EXISTS key_heads_on_lease_delete AFTER DELETE ON leases BEGIN
    UPDATE key_heads SET blocked_until = coalesce(
            (SELECT max(not_before) FROM leases WHERE ordering_key = old.ordering_key), 0)
        WHERE ordering_key = old.ordering_key AND blocked_until IS NOT coalesce(
            (SELECT max(not_before) FROM leases WHERE ordering_key = old.ordering_key), 0);
END;
"""

# Fill key_heads from the rows of an older file (a new file has none).
_FILL_KEY_HEADS = """
INSERT INTO key_heads (ordering_key, head_id, blocked_until)
    SELECT ordering_key, min(id), 0 FROM messages GROUP BY ordering_key;
UPDATE key_heads SET blocked_until = coalesce(
    (SELECT max(not_before) FROM leases WHERE leases.ordering_key = key_heads.ordering_key), 0);
"""

_MIGRATIONS = {
    0: _SCHEMA + _LEASES_SCHEMA + _KEY_HEADS_SCHEMA,
    1: _MIGRATE_FROM_1 + _KEY_HEADS_SCHEMA + _FILL_KEY_HEADS,
    2: _KEY_HEADS_SCHEMA + _FILL_KEY_HEADS,
    SCHEMA_VERSION: "",
}

# The deliverable keys, oldest head first: those with no lease row, and those whose
# leases or delays ran out (few); each part is a range of key_heads_blocked_head.
_READY_KEYS_SQL = """
SELECT * FROM (SELECT ordering_key, head_id FROM key_heads WHERE blocked_until = 0 ORDER BY head_id LIMIT ?2)
UNION ALL
SELECT * FROM (
    SELECT ordering_key, head_id FROM key_heads WHERE blocked_until > 0 AND blocked_until <= ?1
    ORDER BY head_id LIMIT ?2)
ORDER BY head_id LIMIT ?2
"""
_NEXT_DUE_SQL = "SELECT min(blocked_until) FROM key_heads WHERE blocked_until > ?1"

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
            ensure_schema(conn)
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


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the schema in a new file or migrate an older one, under the write lock (once)."""
    # auto_vacuum must be chosen before the first table exists (no-op afterwards).
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the lock: another connection may have done it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"broker file schema {version} is newer than this code's {SCHEMA_VERSION}")
        for statement in _statements(_MIGRATIONS[version]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise


def _statements(script: str) -> Iterator[str]:
    """The script's statements one by one (a trigger body's semicolons do not end one)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


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


def deliverable_keys(
    conn: sqlite3.Connection, now: float, limit: int
) -> tuple[list[tuple[str, int]], float | None]:
    """Up to `limit` (key, head id) that can deliver now, oldest head first; if none, when the next blocked key frees."""
    ready = conn.execute(_READY_KEYS_SQL, (now, limit)).fetchall()
    if ready:
        return ready, None
    return [], conn.execute(_NEXT_DUE_SQL, (now,)).fetchone()[0]
