"""The dead-letter store: activities and messages that can never apply, kept with why.

A SQLite file beside the broker (not in the warehouse), so rejections are recorded
even while the warehouse is down, and the API's status page can read them from its
own process. It lives on one replica's disk: a broker with a dead-letter destination of
its own (Pub/Sub) gets every entry too, a refused activity as a message of its own
(`rejected_activity_message`), so a replica that loses its disk loses no dead letter. `replay` re-publishes entries through the broker after a fix and records
the batch id it published them as (`replayed_batch_id`); an entry whose message came
from such a batch links back to the entry it replays (`replay_of`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson

from app.broker.base import MessageLimits, OutgoingMessage
from app.messages.codec import encode_batch, new_batch_id
from app.schema.activity import Activity
from app.sqlite_files import open_wal

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
    payload BLOB NOT NULL,         -- the activity as JSON, or the message body (JSON; raw if undecodable)
    replayed_at REAL,
    replayed_batch_id TEXT,        -- the batch the replay published (dedup ids '<batch_id>:<table>:<chunk>')
    key_id TEXT                    -- the API key that sent the batch (its id, never the secret)
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_once
    ON dead_letters (kind, dedup_id, activity_index) WHERE dedup_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason);
"""
# Files made before replays were linked, or before keys were scoped, lack a column: added on open.
_MIGRATIONS = {
    "replayed_batch_id": "ALTER TABLE dead_letters ADD COLUMN replayed_batch_id TEXT",
    "key_id": "ALTER TABLE dead_letters ADD COLUMN key_id TEXT",
}
_INDEXES = "CREATE INDEX IF NOT EXISTS dead_letters_replayed_batch ON dead_letters (replayed_batch_id)"
# `replay_of`: the entry whose replay published this entry's message (batch ids hold no ':').
_SELECT = """
SELECT d.id, d.created_at, d.reason, d.kind, d.table_name, d.dedup_id, d.message_id, d.activity_index, d.attempts,
       d.payload, d.replayed_at, d.replayed_batch_id,
       (SELECT o.id FROM dead_letters o
         WHERE o.replayed_batch_id = substr(d.dedup_id, 1, instr(d.dedup_id, ':') - 1)) AS replay_of,
       d.key_id
FROM dead_letters d
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
    replayed_batch_id: str | None = None  # the batch its replay was published as
    replay_of: int | None = None  # the entry whose replay this entry's message came from
    key_id: str | None = None  # the API key that sent the batch

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
    key_id: str | None = None


# Attributes that mark a message on a broker's dead-letter destination as one refused
# activity, and say where it came from.
KIND_ATTRIBUTE = "dead_letter_kind"
SOURCE_DEDUP_ID_ATTRIBUTE = "dead_letter_dedup_id"
ACTIVITY_INDEX_ATTRIBUTE = "dead_letter_activity_index"


def rejected_activity_batch_id(dedup_id: str, index: int) -> str:
    """The batch a refused activity is replayed as: the same wherever it is replayed from
    (the store or the broker's dead-letter topic) and however often, so it applies once."""
    return new_batch_id(f"rejected-activity:{dedup_id}:{index}")


def rejected_activity_message(
    table: str, dedup_id: str, index: int, activity: Activity, limits: MessageLimits
) -> OutgoingMessage:
    """One refused activity as a message of its own, ready to publish again as it is."""
    [message] = encode_batch([activity], rejected_activity_batch_id(dedup_id, index), limits)
    attributes = message.attributes | {
        KIND_ATTRIBUTE: "activity", SOURCE_DEDUP_ID_ATTRIBUTE: dedup_id, ACTIVITY_INDEX_ATTRIBUTE: str(index),
    }
    return OutgoingMessage(message.data, table, attributes)


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = open_wal(self.path, _SCHEMA, synchronous="FULL")
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(dead_letters)")}
        for column, ddl in _MIGRATIONS.items():
            if column not in have:
                self._conn.execute(ddl)
        self._conn.execute(_INDEXES)

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
                e.key_id,
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
                    " activity_index, attempts, payload, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return cur.rowcount

    def list(self, limit: int = 50, include_replayed: bool = False) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE d.replayed_at IS NULL"
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} {where} ORDER BY d.id DESC LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(*row) for row in rows]

    def get(self, ids: Iterable[int]) -> list[DeadLetter]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE d.id IN ({marks}) ORDER BY d.id", ids).fetchall()
        return [DeadLetter(*row) for row in rows]

    def mark_replayed(self, entry_id: int, batch_id: str) -> None:
        """The entry was re-published as `batch_id`: it leaves `list` and links to that batch."""
        with self._lock:
            self._conn.execute(
                "UPDATE dead_letters SET replayed_at = ?, replayed_batch_id = ? WHERE id = ?", (time.time(), batch_id, entry_id)
            )

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
