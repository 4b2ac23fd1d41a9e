"""Warehouse backends by name: `Settings.warehouse` picks one, nothing above names it.

A backend registers how to open it for the subscriber (`open`), optionally for a
process that only reads while a writer may hold it (`open_read_only`; default: `open`),
and where both processes keep delivery receipts (`open_receipts`; default: the local
SQLite file next to the broker, which only works where both processes share a disk).
The built-in ones import lazily, so a DuckDB deployment never loads Google's clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from app.receipts.base import ReceiptStore
    from app.settings import Settings
    from app.warehouse.base import Warehouse

Opener = Callable[["Settings"], "Warehouse"]
ReceiptsOpener = Callable[["Settings"], "ReceiptStore"]


@dataclass(frozen=True, slots=True)
class _Backend:
    open: Opener
    open_read_only: Opener
    open_receipts: ReceiptsOpener


_BACKENDS: dict[str, _Backend] = {}


def register(
    name: str, open: Opener, open_read_only: Opener | None = None, open_receipts: ReceiptsOpener | None = None
) -> None:
    """Make `name` a valid `Settings.warehouse` (a later registration replaces an earlier one)."""
    _BACKENDS[name] = _Backend(open, open_read_only or open, open_receipts or _local_receipts)


def unregister(name: str) -> None:
    _BACKENDS.pop(name, None)


def registered() -> list[str]:
    return sorted(_BACKENDS)


def check_name(name: str) -> str:
    """`name` if registered, else ValueError naming the registered backends."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown warehouse {name!r}; registered: {', '.join(registered())}")
    return name


def open_warehouse(settings: Settings) -> Warehouse:
    """The backend `settings.warehouse` names, opened for writing."""
    warehouse = _BACKENDS[check_name(settings.warehouse)].open(settings)
    warehouse.name = settings.warehouse
    return warehouse


def open_read_only(settings: Settings) -> Warehouse:
    """The backend opened for reads only (DuckDB: the file read-only, without the writer's lock)."""
    warehouse = _BACKENDS[check_name(settings.warehouse)].open_read_only(settings)
    warehouse.name = settings.warehouse
    return warehouse


def open_receipts(settings: Settings) -> ReceiptStore:
    """The receipts store of the backend `settings.warehouse` names (API, subscriber, CLI)."""
    return _BACKENDS[check_name(settings.warehouse)].open_receipts(settings)


def _local_receipts(settings: Settings) -> ReceiptStore:
    from app.receipts.sqlite import SqliteReceiptStore

    return SqliteReceiptStore(settings.receipts_file, settings.receipt_retention_days * 86400)


def _duckdb(settings: Settings) -> Warehouse:
    from app.warehouse.duckdb import DuckDBWarehouse

    return DuckDBWarehouse(settings)


def _duckdb_read_only(settings: Settings) -> Warehouse:
    from app.warehouse.duckdb import DuckDBFileReader

    return DuckDBFileReader(settings)


def _bigquery(settings: Settings) -> Warehouse:
    from app.warehouse.bigquery import BigQueryWarehouse

    return BigQueryWarehouse(settings)


def _bigquery_receipts(settings: Settings) -> ReceiptStore:
    from app.warehouse.bigquery.receipts import BigQueryReceiptStore

    return BigQueryReceiptStore(settings)


register("duckdb", _duckdb, _duckdb_read_only)
register("bigquery", _bigquery, open_receipts=_bigquery_receipts)
