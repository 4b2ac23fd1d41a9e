"""Warehouse backends behind one interface; `make_warehouse` opens the one Settings names
(through `app.warehouse.registry`)."""

from __future__ import annotations

from app.warehouse.base import (
    ApplyResult,
    Capabilities,
    Envelope,
    Rejection,
    TerminalWarehouseError,
    TransientWarehouseError,
    Warehouse,
    WarehouseLocked,
    WarehouseQueryError,
)
from app.warehouse.registry import open_read_only, open_warehouse, register

make_warehouse = open_warehouse  # the name callers have used


__all__ = [
    "ApplyResult",
    "Capabilities",
    "Envelope",
    "Rejection",
    "TerminalWarehouseError",
    "TransientWarehouseError",
    "Warehouse",
    "WarehouseLocked",
    "WarehouseQueryError",
    "make_warehouse",
    "open_read_only",
    "open_warehouse",
    "register",
]
