"""The pipeline's own small SQLite files (dead letters, receipts): one opener for both."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_wal(path: Path, schema: str, *, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode, shared across threads (callers lock), in WAL mode,
    with `schema` applied. `synchronous`: FULL where a lost write loses data, NORMAL where
    it only loses a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
    conn.executescript(schema)
    return conn
