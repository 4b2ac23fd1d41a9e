"""The tables file's table options on DuckDB: only `description` means something here.

It becomes the table's COMMENT (`duckdb_tables().comment`). Partition expiry, clustering,
a required partition filter and labels have no DuckDB counterpart: `tables apply` lists
them as not applicable.
"""

from __future__ import annotations

from typing import Any, Mapping

import duckdb

from app.warehouse.base import OptionsOutcome, option_change
from app.warehouse.duckdb.catalog import quote_ident

DUCKDB_TABLE_OPTIONS = frozenset({"description"})


def _literal(text: str) -> str:
    # COMMENT ON takes no bound parameter (DuckDB's parser refuses `IS $1`), so the
    # value is a string literal: quotes doubled, NUL refused.
    if "\x00" in text:
        raise ValueError("a description cannot hold a NUL character")
    return "'" + text.replace("'", "''") + "'"


def set_description(con: duckdb.DuckDBPyConnection, table: str, description: str) -> None:
    con.execute(f"COMMENT ON TABLE {quote_ident(table)} IS {_literal(description)}")


def read_description(con: duckdb.DuckDBPyConnection, table: str) -> str | None:
    rows = con.execute(
        "SELECT comment FROM duckdb_tables() WHERE schema_name = 'main' AND lower(table_name) = lower(?)", [table]
    ).fetchall()
    return rows[0][0] if rows else None


def apply_options(con: duckdb.DuckDBPyConnection, table: str, options: Mapping[str, Any]) -> OptionsOutcome:
    """Set what differs; the table exists (checked by the caller)."""
    outcome = OptionsOutcome(not_applicable=sorted(n for n in options if n not in DUCKDB_TABLE_OPTIONS))
    wanted = options.get("description")
    if wanted is not None:
        current = read_description(con, table)
        if current != wanted:
            set_description(con, table, wanted)
            outcome.changes.append(option_change("description", current, wanted))
    return outcome
