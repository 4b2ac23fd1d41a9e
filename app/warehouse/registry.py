"""Warehouse backends by name: `Settings.warehouse` picks one, nothing above names it.

A backend registers how to open it for the subscriber (`open`) and, optionally, for a
process that only reads while a writer may hold it (`open_read_only`; default: `open`).
The built-in ones import lazily, so a DuckDB deployment never loads Google's clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from app.settings import Settings
    from app.warehouse.base import Warehouse

Opener = Callable[["Settings"], "Warehouse"]


@dataclass(frozen=True, slots=True)
class _Backend:
    open: Opener
    open_read_only: Opener


_BACKENDS: dict[str, _Backend] = {}


def register(name: str, open: Opener, open_read_only: Opener | None = None) -> None:
    """Make `name` a valid `Settings.warehouse` (a later registration replaces an earlier one)."""
    _BACKENDS[name] = _Backend(open, open_read_only or open)


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


def _duckdb(settings: Settings) -> Warehouse:
    from app.warehouse.duckdb import DuckDBWarehouse

    return DuckDBWarehouse(settings)


def _duckdb_read_only(settings: Settings) -> Warehouse:
    from app.warehouse.duckdb import DuckDBFileReader

    return DuckDBFileReader(settings)


def _bigquery(settings: Settings) -> Warehouse:
    from app.warehouse.bigquery import BigQueryWarehouse

    return BigQueryWarehouse(settings)


register("duckdb", _duckdb, _duckdb_read_only)
register("bigquery", _bigquery)
