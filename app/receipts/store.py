"""The receipts file: accepted batches (written by the API) and message outcomes (by the subscriber).

A batch's state per table follows from both: `accepted` until every message of that
table has an outcome, then `dead_lettered` if any of its activities were, else
`applied`; a table all of whose activities a contract quarantined is `quarantined` (they
travel to `_ingest_quarantine`, listed as a table of its own). Outcomes are keyed by dedup id, so a redelivered message is counted once.
Receipts older than the retention are purged; their batch ids are kept a while longer
as tombstones, so a lookup can answer "gone" (410) rather than "never seen" (404).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from app.sqlite_files import open_wal

BATCH_ID_PATTERN = re.compile(r"[0-9a-f]{32}\Z")  # what `new_batch_id` makes
TOMBSTONE_SECONDS = 30 * 86400

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


@dataclass(frozen=True, slots=True)
class Accepted:
    """One table's share of an accepted batch."""

    table: str
    messages: int
    activities: int
    quarantined: int = 0  # activities a contract sent to `_ingest_quarantine` instead


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message: rows applied, rows dead-lettered (with the first reason)."""

    dedup_id: str
    batch_id: str
    table: str
    rows_applied: int
    rows_dead_lettered: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class TableReceipt:
    table: str
    state: str  # accepted | applied | dead_lettered | quarantined
    activities: int
    rows_applied: int
    rows_dead_lettered: int
    settled_at: float | None  # when its last message was applied or dead-lettered
    reason: str | None
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class Receipt:
    batch_id: str
    key_id: str | None
    accepted_at: float
    tables: list[TableReceipt]

    @property
    def state(self) -> str:
        """The batch's least settled state: accepted, then dead_lettered, then quarantined, then applied."""
        states = {t.state for t in self.tables}
        return next(s for s in ("accepted", "dead_lettered", "quarantined", "applied") if s in states)

    def as_json(self) -> dict[str, Any]:
        """The answer of `GET /api-log/v1/batches/{id}` and `python -m app batch ID`."""
        return {
            "batch_id": self.batch_id,
            "state": self.state,
            "key_id": self.key_id,
            "accepted_at": _time(self.accepted_at),
            "tables": [
                {"table": t.table, "state": t.state, "activities": t.activities, "rows_applied": t.rows_applied,
                 "rows_dead_lettered": t.rows_dead_lettered, "quarantined": t.quarantined,
                 "settled_at": _time(t.settled_at), "reason": t.reason}
                for t in self.tables
            ],
        }


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class ReceiptStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = open_wal(self.path, _SCHEMA, synchronous="NORMAL")  # a receipt is a report, not the data

    def add_accepted(self, batches: Iterable[tuple[str, str | None, float, list[Accepted]]]) -> None:
        """(batch id, key id, accepted at, per-table shares) of accepted batches, in one transaction."""
        rows = [(b, k, at, a.table, a.messages, a.activities, a.quarantined) for b, k, at, shares in batches for a in shares]
        self._write(
            "INSERT OR IGNORE INTO accepted (batch_id, key_id, accepted_at, table_name, messages, activities, quarantined)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def add_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        now = time.time()
        rows = [(o.dedup_id, o.batch_id, o.table, o.rows_applied, o.rows_dead_lettered, o.reason, now) for o in outcomes]
        self._write(
            "INSERT OR IGNORE INTO outcomes (dedup_id, batch_id, table_name, rows_applied, rows_dead_lettered, reason,"
            " settled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def lookup(self, batch_id: str) -> Receipt | None:
        with self._lock:
            accepted = self._conn.execute(
                "SELECT table_name, key_id, accepted_at, messages, activities, quarantined FROM accepted WHERE batch_id = ?"
                " ORDER BY rowid", (batch_id,),
            ).fetchall()
            settled = self._conn.execute(
                "SELECT table_name, count(*), sum(rows_applied), sum(rows_dead_lettered), max(settled_at),"
                " min(reason) FROM outcomes WHERE batch_id = ? GROUP BY table_name", (batch_id,),
            ).fetchall()
        if not accepted:
            return None
        by_table = {row[0]: row[1:] for row in settled}
        tables = []
        for table, _, _, messages, activities, quarantined in accepted:
            count, applied, dead, settled_at, reason = by_table.get(table, (0, 0, 0, None, None))
            if not messages:  # every activity of the table was quarantined
                state = "quarantined"
            else:
                state = "accepted" if count < messages else ("dead_lettered" if dead else "applied")
            tables.append(TableReceipt(table, state, activities, applied or 0, dead or 0,
                                       settled_at if state not in ("accepted", "quarantined") else None, reason,
                                       quarantined))
        return Receipt(batch_id, accepted[0][1], accepted[0][2], tables)

    def purged_key(self, batch_id: str) -> tuple[bool, str | None]:
        """Whether the batch's receipt was purged, and the key that sent it."""
        with self._lock:
            row = self._conn.execute("SELECT key_id FROM purged WHERE batch_id = ?", (batch_id,)).fetchone()
        return (row is not None, row[0] if row else None)

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

    def _write(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
