"""Type widening on DuckDB: one `ALTER COLUMN ... SET DATA TYPE` per widened column.

Every pair of app.schema.widening applies. DuckDB's own casts keep integers and
decimals exact and give floats the nearest double; a `bignumeric` column is the
canonical decimal text (types.py), so a DECIMAL becomes that text without the trailing
zeros DuckDB's cast prints (`1.500000000` -> `1.5`, `2.000000000` -> `2`): equal
values stay equal text, and deletes still match them.
"""

from __future__ import annotations

from app.warehouse.duckdb.catalog import quote_ident
from app.warehouse.duckdb.types import DuckType
from app.schema.widening import WIDENINGS

DUCKDB_WIDENINGS = WIDENINGS


def _using(column: str, old: str, new: str) -> str:
    if new == "bignumeric" and old == "numeric":
        text = f"CAST({column} AS VARCHAR)"
        return f" USING regexp_replace(regexp_replace({text}, '(\\.[0-9]*?)0+$', '\\1'), '\\.$', '')"
    return ""  # DuckDB's cast


def widen_sql(table: str, column: str, old: str, new: str, types: dict[str, DuckType]) -> str:
    qcolumn = quote_ident(column)
    return f"ALTER TABLE {quote_ident(table)} ALTER COLUMN {qcolumn} SET DATA TYPE {types[new].sql_type}{_using(qcolumn, old, new)}"
