"""The opener of the pipeline's own SQLite files."""

from __future__ import annotations

from app.sqlite_files import open_wal


def test_opens_in_wal_mode_with_the_schema_and_the_durability_asked_for(tmp_path):
    schema = "CREATE TABLE IF NOT EXISTS notes (n INTEGER)"
    full = open_wal(tmp_path / "a" / "full.sqlite", schema, synchronous="FULL")
    normal = open_wal(tmp_path / "normal.sqlite", schema, synchronous="NORMAL")
    assert full.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert full.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert normal.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    full.execute("INSERT INTO notes VALUES (1)")  # autocommit: another connection sees it at once
    assert open_wal(tmp_path / "a" / "full.sqlite", schema, synchronous="FULL").execute("SELECT n FROM notes").fetchall() == [(1,)]
