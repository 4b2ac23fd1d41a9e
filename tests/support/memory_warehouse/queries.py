"""Read-only SQL over the in-memory tables: an in-memory DuckDB connection per query that
sees only Arrow copies of the tables, so nothing it runs can change them."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import duckdb

from app.warehouse.base import QueryResult, WarehouseQueryError
from tests.support.memory_warehouse.tables import StoredTable

# DuckDB result types -> activity types. VARCHAR is also how bignumeric, geography and
# record are stored: a result column named like such a column takes its type.
_TYPE_BY_DUCKDB = {
    "VARCHAR": "string",
    "BLOB": "bytes",
    "BOOLEAN": "boolean",
    "TIMESTAMP WITH TIME ZONE": "timestamp",
    "DATE": "date",
    "TIME": "time",
    "TIMESTAMP": "datetime",
    "JSON": "record",
}
_INTEGERS = re.compile(r"(U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?)\Z")
_FLOATS = re.compile(r"(FLOAT|DOUBLE|REAL)\Z")


def _activity_type(duckdb_type: str, column: str, text_columns: Mapping[str, str]) -> str:
    if duckdb_type == "VARCHAR":
        return text_columns.get(column.lower(), "string")
    if duckdb_type.startswith("DECIMAL"):
        return "numeric"
    if _INTEGERS.match(duckdb_type):
        return "integer"
    if _FLOATS.match(duckdb_type):
        return "float"
    return _TYPE_BY_DUCKDB.get(duckdb_type, "string")


def _check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise WarehouseQueryError("only one read-only SELECT is allowed")


def run_query(tables: Mapping[str, StoredTable], sql: str, params: Sequence[Any] | None) -> QueryResult:
    con = duckdb.connect(":memory:")
    try:
        _check_read_only(con, sql)
        text_columns: dict[str, str] = {}
        for name, stored in tables.items():
            con.register(name, stored.to_arrow())
            for column, typ in stored.schema.values():
                if typ in ("bignumeric", "geography", "record"):
                    text_columns[column.lower()] = typ
        con.execute("SET enable_external_access = false")  # no files: read_csv, COPY, ATTACH
        try:
            result = con.execute(sql, list(params) if params else None)
            description = result.description or []
            arrow = result.to_arrow_table()
        except duckdb.Error as exc:
            raise WarehouseQueryError(str(exc)) from exc
        columns = list(arrow.column_names)
        rows = list(zip(*(col.to_pylist() for col in arrow.columns))) if arrow.num_columns else []
        types = [_activity_type(str(d[1]), name, text_columns) for d, name in zip(description, columns)]
        return QueryResult(columns, rows, types)
    finally:
        con.close()
