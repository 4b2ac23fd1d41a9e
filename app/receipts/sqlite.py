"""The local receipts file (SQLite, next to the broker): accepted batches (written by the
API) and message outcomes (by the subscriber).

Receipts older than the retention are purged; their batch ids are kept a while longer
as tombstones, so a lookup can answer "gone" (410) rather than "never seen" (404).
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Iterable

from app.receipts.base import (
    ANY_SENDER, Accepted, AcceptedRow, Outcome, OutcomeRow, Receipt, ReceiptStore, past_retention, receipt_of,
)
from app.sqlite_files import open_wal

TOMBSTONE_SECONDS = 30 * 86400
DEFAULT_RETENTION_SECONDS = 7 * 86400
# 7 parameters a row: 128 rows per statement stays under SQLite's historical limit of
# 999 variables. One statement per chunk, not one per row: executemany hands the GIL
# over once per row, which the API's event loop paid for (py-spy, docs/benchmarks.md).
ROWS_PER_STATEMENT = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted (
    batch_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    key_id TEXT,
    accepted_at REAL NOT NULL,
    messages INTEGER NOT NULL,
    activities INTEGER NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, table_name)
);
CREATE INDEX IF NOT EXISTS accepted_at ON accepted (accepted_at);
CREATE TABLE IF NOT EXISTS outcomes (
    dedup_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    rows_applied INTEGER NOT NULL,
    rows_dead_lettered INTEGER NOT NULL,
    reason TEXT,
    settled_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_batch ON outcomes (batch_id, table_name);
CREATE TABLE IF NOT EXISTS purged (
    batch_id TEXT PRIMARY KEY,
    key_id TEXT,
    purged_at REAL NOT NULL
);
"""


@functools.lru_cache(maxsize=64)
def _insert_sql(head: str, columns: int, rows: int) -> str:
    row = "(" + ", ".join(["?"] * columns) + ")"
    return f"{head} VALUES {', '.join([row] * rows)}"


_ACCEPTED_INSERT = (
    "INSERT OR IGNORE INTO accepted (batch_id, key_id, accepted_at, table_name, messages, activities, quarantined)"
)
_OUTCOME_INSERT = (
    "INSERT OR IGNORE INTO outcomes (dedup_id, batch_id, table_name, rows_applied, rows_dead_lettered, reason,"
    " settled_at)"
)


class SqliteReceiptStore(ReceiptStore):
    def __init__(self, path: Path, retention_seconds: float = DEFAULT_RETENTION_SECONDS) -> None:
        self.path = Path(path)
        self.retention_seconds = retention_seconds
        self._lock = threading.Lock()
        self._conn = open_wal(self.path, _SCHEMA, synchronous="NORMAL")  # a receipt is a report, not the data

    def add_accepted(self, batches: Iterable[tuple[str, str | None, float, list[Accepted]]]) -> None:
        rows = [(b, k, at, a.table, a.messages, a.activities, a.quarantined) for b, k, at, shares in batches for a in shares]
        self._write(_ACCEPTED_INSERT, rows)

    def add_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        now = time.time()
        rows = [(o.dedup_id, o.batch_id, o.table, o.rows_applied, o.rows_dead_lettered, o.reason, now) for o in outcomes]
        self._write(_OUTCOME_INSERT, rows)

    def lookup(self, batch_id: str) -> Receipt | None:
        with self._lock:
            accepted = self._conn.execute(
                "SELECT table_name, key_id, accepted_at, messages, activities, quarantined FROM accepted"
                " WHERE batch_id = ? ORDER BY rowid", (batch_id,),
            ).fetchall()
            outcomes = self._conn.execute(
                "SELECT dedup_id, table_name, rows_applied, rows_dead_lettered, reason, settled_at FROM outcomes"
                " WHERE batch_id = ?", (batch_id,),
            ).fetchall() if accepted else []
        return receipt_of(batch_id, [AcceptedRow(*row) for row in accepted], [OutcomeRow(*row) for row in outcomes])

    def gone(self, batch_id: str) -> tuple[bool, object]:
        with self._lock:
            row = self._conn.execute("SELECT key_id FROM purged WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is not None:
            return True, row[0]
        if past_retention(batch_id, self.retention_seconds):  # its tombstone is gone too
            return True, ANY_SENDER
        return False, None

    def purge(self, retention_seconds: float, now: float | None = None) -> int:
        """Drops receipts older than the retention (keeping tombstones); returns how many batches."""
        now = time.time() if now is None else now
        cutoff = now - retention_seconds
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO purged (batch_id, key_id, purged_at)"
                    " SELECT batch_id, min(key_id), ? FROM accepted WHERE accepted_at < ? GROUP BY batch_id",
                    (now, cutoff),
                )
                self._conn.execute(
                    "DELETE FROM outcomes WHERE batch_id IN (SELECT batch_id FROM accepted WHERE accepted_at < ?)",
                    (cutoff,),
                )
                self._conn.execute("DELETE FROM accepted WHERE accepted_at < ?", (cutoff,))
                self._conn.execute("DELETE FROM outcomes WHERE settled_at < ?", (cutoff,))  # never accepted here
                self._conn.execute("DELETE FROM purged WHERE purged_at < ?", (now - TOMBSTONE_SECONDS,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, head: str, rows: list[tuple]) -> None:
        if not rows:
            return
        columns = len(rows[0])
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(rows), ROWS_PER_STATEMENT):
                    chunk = rows[start : start + ROWS_PER_STATEMENT]
                    self._conn.execute(_insert_sql(head, columns, len(chunk)), [v for row in chunk for v in row])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
