"""Fixtures for the warehouse tests: the same contract suite runs against every backend.

Adding a backend is one entry in `BACKENDS`: a factory taking pytest's `tmp_path` and
returning a `Backend`: the warehouse, and how its SQL names a table and reads a column
back (`read_rows` builds its SELECT from those two). A factory may `pytest.skip` when its emulator is missing,
but must fail instead when CI=true (use `skip_unless_ci`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import shapely
import shapely.wkb
import shapely.wkt

from app.settings import Settings
from app.warehouse.base import Warehouse


@dataclass
class Backend:
    name: str
    warehouse: Warehouse
    table_sql: Callable[[str], str]  # table -> the table as this backend's SQL names it
    # (column, activity type) -> a select expression giving a value `normalize_value` reads
    column_sql: Callable[[str, str], str]
    # table -> its table options as the backend's own metadata shows them (tables file names)
    read_options: Callable[[str], dict[str, Any]] = lambda table: {}

    def read_rows(self, table: str, columns: list[tuple[str, str]]) -> list[tuple]:
        """The table's rows, each value normalized by `normalize_value` (any order)."""
        exprs = ", ".join(self.column_sql(name, typ) for name, typ in columns)
        _, rows = self.warehouse.query(f"SELECT {exprs} FROM {self.table_sql(table)}")
        return [tuple(normalize_value(typ, v) for (_, typ), v in zip(columns, row)) for row in rows]

    def close(self) -> None:
        self.warehouse.close()

    @staticmethod
    def normalize(typ: str, value: Any) -> Any:
        return normalize_value(typ, value)


def skip_unless_ci(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


# --------------------------------------------------------------------------- normalization


def normalize_value(typ: str, value: Any) -> Any:
    """One comparable Python form per activity type, whatever a backend returned.

    string -> str, bytes -> bytes, integer -> int, float -> float (NaN -> "NaN"),
    numeric / bignumeric -> Decimal, boolean -> bool, timestamp -> aware UTC datetime,
    date -> date, time -> time, datetime -> naive datetime, geography -> normalized WKT,
    record -> dict.
    """
    if value is None:
        return None
    if typ == "bytes":
        if isinstance(value, str):
            return base64.b64decode(value)
        return bytes(value)
    if typ == "integer":
        return int(value)
    if typ == "float":
        f = float(value)
        return "NaN" if math.isnan(f) else f
    if typ in ("numeric", "bignumeric"):
        return Decimal(str(value))  # Decimal equality is numeric: 1.500 == 1.5
    if typ == "timestamp":
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert value.tzinfo is not None, f"timestamp came back without a zone: {value!r}"
        return value.astimezone(dt.timezone.utc)
    if typ == "date" and isinstance(value, str):
        return dt.date.fromisoformat(value)
    if typ == "time" and isinstance(value, str):
        return dt.time.fromisoformat(value)
    if typ == "datetime":
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        assert value.tzinfo is None, f"datetime came back with a zone: {value!r}"
        return value
    if typ == "geography":
        geom = shapely.wkb.loads(bytes(value)) if isinstance(value, (bytes, bytearray, memoryview)) else shapely.wkt.loads(value)
        return shapely.wkt.dumps(shapely.normalize(geom), rounding_precision=6, trim=True)
    if typ == "record":
        return json.loads(value) if isinstance(value, str) else value
    return value


# --------------------------------------------------------------------------- backends


def _double_quoted(name: str) -> str:
    return '"' + name + '"'


def _duckdb_backend(tmp_path: Path) -> Backend:
    from app.warehouse.duckdb import DuckDBWarehouse

    wh = DuckDBWarehouse(Settings(data_dir=tmp_path / "data"))

    def column_sql(name: str, typ: str) -> str:
        if typ == "geography" and wh.capabilities.supports_geometry:
            return f"ST_AsText({_double_quoted(name)})"
        if typ == "record":
            return f"CAST({_double_quoted(name)} AS VARCHAR)"
        return _double_quoted(name)

    def read_options(table: str) -> dict[str, Any]:
        _, rows = wh.query("SELECT comment FROM duckdb_tables() WHERE table_name = ?", [table])
        return {"description": rows[0][0]} if rows and rows[0][0] is not None else {}

    return Backend("duckdb", wh, _double_quoted, column_sql, read_options)


def _memory_backend(tmp_path: Path) -> Backend:
    """The in-memory warehouse (tests.support.memory_warehouse): DuckDB SQL over Arrow copies
    in which geography is WKT text and record JSON text, as `normalize_value` reads them."""
    from tests.support.memory_warehouse import MemoryWarehouse

    return Backend("memory", MemoryWarehouse(), _double_quoted, lambda name, typ: _double_quoted(name))


# BigQuery select expressions per type; the BYTES one is an emulator quirk only (BYTES do
# not always round-trip through its query results)
_BIGQUERY_READS = {
    "geography": "ST_ASTEXT({})",
    "record": "TO_JSON_STRING({})",
    "bignumeric": "CAST({} AS STRING)",
    "bytes": "TO_BASE64({})",
}


def _bigquery_backend(tmp_path: Path) -> Backend:
    """BigQuery over the wire against bqemulator (one emulator per session, a dataset per test)."""
    from app.warehouse.bigquery import BigQueryWarehouse
    from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES, EmulatorUnavailable, shared_emulator

    try:
        emu = shared_emulator()
    except EmulatorUnavailable as exc:
        skip_unless_ci(str(exc))
        raise
    settings = emu.settings(tmp_path / "data", "wh_")
    wh = BigQueryWarehouse(settings, type_overrides=EMULATOR_TYPE_OVERRIDES)

    def read_options(table: str) -> dict[str, Any]:
        t = wh.client.get_table(f"{settings.gcp_project}.{settings.bigquery_dataset}.{table}")
        expiration = t.time_partitioning.expiration_ms if t.time_partitioning else None
        found = {
            "description": t.description, "labels": dict(t.labels or {}) or None,
            "clustering": list(t.clustering_fields or []) or None,
            "partition_expiration_days": None if expiration is None else int(expiration) / 86_400_000,
            "require_partition_filter": t.require_partition_filter,
        }  # fmt: skip
        return {name: value for name, value in found.items() if value is not None}

    return Backend(
        "bigquery",
        wh,
        lambda table: f"`{settings.bigquery_dataset}.{table}`",
        lambda name, typ: _BIGQUERY_READS.get(typ, "{}").format(f"`{name}`"),
        read_options,
    )


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "duckdb": _duckdb_backend,
    "bigquery": _bigquery_backend,
    "memory": _memory_backend,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def warehouse(backend: Backend) -> Warehouse:
    return backend.warehouse


@pytest.fixture
def table() -> str:
    """A fresh table name (backends may share a dataset across tests)."""
    return "t_" + uuid.uuid4().hex[:12]
