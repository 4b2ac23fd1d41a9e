"""Warehouse backends behind one interface; `make_warehouse` picks one from Settings."""

from __future__ import annotations

from app.settings import Settings
from app.warehouse.base import (
    ApplyResult,
    Capabilities,
    Envelope,
    Rejection,
    TerminalWarehouseError,
    TransientWarehouseError,
    Warehouse,
    WarehouseQueryError,
)


def make_warehouse(settings: Settings) -> Warehouse:
    if settings.warehouse == "bigquery":
        from app.warehouse.bigquery import BigQueryWarehouse

        return BigQueryWarehouse(settings)
    from app.warehouse.duckdb import DuckDBWarehouse

    return DuckDBWarehouse(settings)


__all__ = [
    "ApplyResult",
    "Capabilities",
    "Envelope",
    "Rejection",
    "TerminalWarehouseError",
    "TransientWarehouseError",
    "Warehouse",
    "WarehouseQueryError",
    "make_warehouse",
]
