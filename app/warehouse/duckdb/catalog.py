"""What the DuckDB file holds: the pipeline's bookkeeping tables, user tables, their schemas.

The activity types of the columns are kept in `_ingest_columns` (VARCHAR is ambiguous
between string and bignumeric); a column missing there reads through the type mapper, so
a created table records only its ambiguous columns (`Writer.needs_record`).
A table's key (fixed by its first upsert) is kept in `_ingest_keys`, for every keyed
table: only a table created by an upsert also declares it as its PRIMARY KEY (one that
existed before may hold rows sharing a key, until upserts replace them).
"""

from __future__ import annotations

from typing import Sequence

import duckdb

from app.schema.identifiers import IDENTIFIER, INTERNAL_PREFIX, is_internal
from app.warehouse.duckdb.types import TYPE_MAPPER
from app.warehouse.plan import Schema

APPLIED_TABLE = INTERNAL_PREFIX + "applied"
COLUMNS_TABLE = INTERNAL_PREFIX + "columns"
KEYS_TABLE = INTERNAL_PREFIX + "keys"
STAGE_VIEW = INTERNAL_PREFIX + "stage"  # connection-local Arrow view used while applying
STAGE_TABLE = "temp." + INTERNAL_PREFIX + "staged"  # + a number: temporary tables of one apply's inserts
_COUNTS_PER_QUERY = 50


def quote_ident(name: str) -> str:
    """Double-quote an identifier after checking it is a plain name (defence in depth)."""
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise ValueError(f"refusing identifier {name!r}")
    return '"' + name + '"'


def create_bookkeeping(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {APPLIED_TABLE} (dedup_id VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {COLUMNS_TABLE} (table_name VARCHAR NOT NULL, "
        "column_name VARCHAR NOT NULL, activity_type VARCHAR NOT NULL, "
        "PRIMARY KEY (table_name, column_name))"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (table_name VARCHAR PRIMARY KEY, key_columns VARCHAR[] NOT NULL)"
    )


def has_bookkeeping(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND table_name = ?",
        [COLUMNS_TABLE],
    ).fetchone()[0] > 0


def read_schema(con: duckdb.DuckDBPyConnection, table: str) -> Schema | None:
    return read_schemas(con, [table]).get(table.lower())


def read_schemas(con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> dict[str, Schema]:
    """The schemas of the existing tables among `tables`, by lower-case name: one catalog
    query however many tables (a many-table apply reads them all at once)."""
    rows = con.execute(
        f"""SELECT lower(c.table_name), c.column_name, c.data_type, m.activity_type
            FROM information_schema.columns c
            LEFT JOIN {COLUMNS_TABLE} m
              ON m.table_name = lower(c.table_name) AND lower(m.column_name) = lower(c.column_name)
            WHERE c.table_schema = 'main' AND lower(c.table_name) IN (SELECT lower(unnest(?::VARCHAR[])))
            ORDER BY c.table_name, c.ordinal_position""",
        [list(tables)],
    ).fetchall()
    schemas: dict[str, Schema] = {}
    for table, name, data_type, activity_type in rows:
        typ = activity_type or TYPE_MAPPER.activity_type_of(str(data_type)) or f"unsupported:{data_type}"
        schemas.setdefault(table, Schema())[name.lower()] = (name, typ)
    if schemas:
        keys = con.execute(
            f"SELECT table_name, key_columns FROM {KEYS_TABLE} WHERE table_name IN (SELECT unnest(?::VARCHAR[]))",
            [list(schemas)],
        ).fetchall()
        for table, key in keys:
            schemas[table].key = tuple(key)
    return schemas


def table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Lower-case names of every table in the file (the pipeline's own included)."""
    rows = con.execute("SELECT lower(table_name) FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
    return {name for (name,) in rows}


def list_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """User tables, sorted; a table not named as the pipeline names tables is not one of them."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND table_type = 'BASE TABLE'"
    ).fetchall()
    return sorted(name for (name,) in rows if IDENTIFIER.match(name) and not is_internal(name))


def count_rows(con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> dict[str, int]:
    """Exact counts of the existing user tables among `tables` (DuckDB names ignore case)."""
    existing = {name.lower() for name in list_tables(con)}
    wanted = [name for name in dict.fromkeys(tables) if isinstance(name, str) and name.lower() in existing]
    counts: dict[str, int] = {}
    for start in range(0, len(wanted), _COUNTS_PER_QUERY):
        chunk = wanted[start : start + _COUNTS_PER_QUERY]
        sql = " UNION ALL ".join(f"SELECT ? AS t, count(*) AS n FROM {quote_ident(name)}" for name in chunk)
        counts.update({name: int(n) for name, n in con.execute(sql, chunk).fetchall()})
    return counts
