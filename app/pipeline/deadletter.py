"""The dead-letter store: activities and messages that can never apply, kept with why.

A SQLite file beside the broker (not in the warehouse), so rejections are recorded
even while the warehouse is down, and the API's status page can read them from its
own process. `replay` re-publishes entries through the broker after a fix.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL,
    kind TEXT NOT NULL,            -- 'activity' (one rejected activity) or 'message' (undecodable)
    table_name TEXT,
    dedup_id TEXT,
    message_id TEXT,
    activity_index INTEGER,
    attempts INTEGER NOT NULL,
    payload BLOB NOT NULL,         -- the activity as JSON, or the raw message body
    replayed_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_once
    ON dead_letters (kind, dedup_id, activity_index) WHERE dedup_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason);
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    created_at: float
    reason: str
    kind: str
    table_name: str | None
    dedup_id: str | None
    message_id: str | None
    activity_index: int | None
    attempts: int
    payload: bytes
    replayed_at: float | None

    def payload_json(self) -> Any:
        try:
            return orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            return None


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    reason: str
    kind: str
    payload: bytes
    attempts: int
    table_name: str | None = None
    dedup_id: str | None = None
    message_id: str | None = None
    activity_index: int | None = None


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def add(self, entries: Iterable[NewDeadLetter]) -> int:
        """Record entries durably; a redelivered rejection of the same activity is kept once."""
        rows = [
            (
                time.time(),
                e.reason,
                e.kind,
                e.table_name,
                e.dedup_id,
                e.message_id,
                e.activity_index,
                e.attempts,
                e.payload,
            )
            for e in entries
        ]
        if not rows:
            return 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.executemany(
                    "INSERT OR IGNORE INTO dead_letters (created_at, reason, kind, table_name, dedup_id, message_id,"
                    " activity_index, attempts, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return cur.rowcount

    def list(self, limit: int = 50, include_replayed: bool = False) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE replayed_at IS NULL"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, created_at, reason, kind, table_name, dedup_id, message_id, activity_index, attempts,"
                f" payload, replayed_at FROM dead_letters {where} ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def get(self, ids: Iterable[int]) -> list[DeadLetter]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, created_at, reason, kind, table_name, dedup_id, message_id, activity_index, attempts,"
                f" payload, replayed_at FROM dead_letters WHERE id IN ({marks}) ORDER BY id",
                ids,
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def mark_replayed(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        with self._lock:
            self._conn.executemany("UPDATE dead_letters SET replayed_at = ? WHERE id = ?", [(time.time(), i) for i in ids])

    def counts_by_reason(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT reason, count(*) FROM dead_letters WHERE replayed_at IS NULL GROUP BY reason"
            ).fetchall()
        return dict(rows)

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
