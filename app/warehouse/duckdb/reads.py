"""Reading DuckDB: one SELECT always rolled back, on the writer's connection or on the file.

`DuckDBFileReader` is the read-only backend (`app.warehouse.registry.open_read_only`):
it opens the file read-only for each call, so it needs no writer's lock and raises
`DuckDBFileLocked` while a subscriber holds the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import duckdb

from app.settings import Settings
from app.warehouse.base import (
    ApplyResult,
    Envelope,
    QueryResult,
    TerminalWarehouseError,
    Warehouse,
    WarehouseQueryError,
)
from app.warehouse.duckdb import catalog
from app.warehouse.duckdb.capabilities import duckdb_capabilities
from app.warehouse.duckdb.connection import open_connection
from app.warehouse.duckdb.errors import opening_failed
from app.warehouse.duckdb.types import TYPE_MAPPER

T = TypeVar("T")


def _check_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    if len(statements) != 1:
        raise WarehouseQueryError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        raise WarehouseQueryError(f"only read-only SELECT queries are allowed, got {kind.name}")


def run_read_only(cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None) -> QueryResult:
    _check_select(cur, sql)
    cur.execute("BEGIN TRANSACTION")
    try:
        result = cur.execute(sql, list(params) if params else None)
        types = [TYPE_MAPPER.activity_type_of(str(d[1])) for d in result.description or []]
        arrow = result.to_arrow_table()
        names = list(arrow.column_names)
        rows = list(zip(*(col.to_pylist() for col in arrow.columns))) if arrow.num_columns else []
        return QueryResult(names, rows, types)
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    finally:
        try:
            cur.execute("ROLLBACK")
        except duckdb.Error:
            pass


def _with_file(path: Path, read: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    try:
        con, _ = open_connection(path, read_only=True)
    except duckdb.Error as exc:
        raise opening_failed(path, exc) from exc
    try:
        return read(con)
    finally:
        con.close()


def query_file(path: str | os.PathLike[str], sql: str, params: Sequence[Any] | None = None) -> QueryResult:
    """Run one SELECT on a DuckDB warehouse file opened read-only (no subscriber running).

    Raises `DuckDBFileLocked` if a writer holds the file (query the subscriber's admin
    port instead) and `WarehouseQueryError` for a missing file or a failing query.
    """
    path = Path(path)
    if not path.exists():
        raise WarehouseQueryError(f"no DuckDB warehouse at {path}")
    return _with_file(path, lambda con: run_read_only(con, sql, params))


def _catalog_read(con: duckdb.DuckDBPyConnection, read: Callable[[duckdb.DuckDBPyConnection], T], empty: T) -> T:
    try:
        return read(con) if catalog.has_bookkeeping(con) else empty
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc


def table_schema_file(path: str | os.PathLike[str], table: str) -> dict[str, str] | None:
    """`Warehouse.table_schema` on a file opened read-only (no subscriber running).

    None if the file or the table does not exist; `DuckDBFileLocked` if a writer holds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    schema = _with_file(path, lambda con: _catalog_read(con, lambda c: catalog.read_schema(c, table), None))
    return None if schema is None else {name: typ for name, typ in schema.values()}


class DuckDBFileReader(Warehouse):
    """The warehouse file, read-only, opened per call; `apply` refuses."""

    def __init__(self, settings: Settings) -> None:
        self.path = Path(settings.duckdb_file)
        self.capabilities = duckdb_capabilities(spatial=True)

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        raise TerminalWarehouseError(f"{self.path} is open read-only")

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        return query_file(self.path, sql, params)

    def table_schema(self, table: str) -> dict[str, str] | None:
        return table_schema_file(self.path, table)

    def list_tables(self) -> list[str]:
        if not self.path.exists():
            return []
        return _with_file(self.path, lambda con: _catalog_read(con, catalog.list_tables, []))

    def count_rows(self, tables: Sequence[str]) -> dict[str, int]:
        if not self.path.exists():
            return {}
        return _with_file(self.path, lambda con: _catalog_read(con, lambda c: catalog.count_rows(c, tables), {}))
