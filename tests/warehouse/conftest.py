"""Fixtures for the warehouse tests: the same contract suite runs against every backend.

Adding a backend is one entry in `BACKENDS`: a factory taking pytest's `tmp_path` and
returning a `Backend` (the warehouse, a `read_rows` adapter that reads a table back with
backend-specific SQL, and `table_sql`: how that SQL names a table). A factory may `pytest.skip` when its emulator is missing,
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
    # (table, [(column, activity type)]) -> rows of values normalized by `normalize_value`
    read_rows: Callable[[str, list[tuple[str, str]]], list[tuple]]
    # table -> the table as this backend's SQL names it (quoted, qualified)
    table_sql: Callable[[str], str]

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


def _duckdb_backend(tmp_path: Path) -> Backend:
    from app.warehouse.duckdb import DuckDBWarehouse

    wh = DuckDBWarehouse(Settings(data_dir=tmp_path / "data"))

    def read_rows(table: str, columns: list[tuple[str, str]]) -> list[tuple]:
        exprs = []
        for name, typ in columns:
            q = '"' + name + '"'
            if typ == "geography" and wh.capabilities.supports_geometry:
                exprs.append(f"ST_AsText({q})")
            elif typ == "record":
                exprs.append(f"CAST({q} AS VARCHAR)")
            else:
                exprs.append(q)
        _, rows = wh.query(f'SELECT {", ".join(exprs)} FROM "{table}"')
        return [tuple(normalize_value(typ, v) for (_, typ), v in zip(columns, row)) for row in rows]

    return Backend("duckdb", wh, read_rows, _double_quoted)


def _double_quoted(table: str) -> str:
    return '"' + table + '"'


def _memory_backend(tmp_path: Path) -> Backend:
    """The in-memory warehouse (tests.support.memory_warehouse): DuckDB SQL over Arrow copies."""
    from tests.support.memory_warehouse import MemoryWarehouse

    wh = MemoryWarehouse()

    def read_rows(table: str, columns: list[tuple[str, str]]) -> list[tuple]:
        # geography is WKT text and record JSON text here: `normalize_value` reads both
        _, rows = wh.query(f'SELECT {", ".join(_double_quoted(name) for name, _ in columns)} FROM "{table}"')
        return [tuple(normalize_value(typ, v) for (_, typ), v in zip(columns, row)) for row in rows]

    return Backend("memory", wh, read_rows, _double_quoted)


def _bigquery_backend(tmp_path: Path) -> Backend:
    """BigQuery over the wire against bqemulator (one emulator per session, a dataset per test)."""
    from app.warehouse.bigquery import BigQueryWarehouse
    from tests.support.bqemulator import EmulatorUnavailable, shared_emulator

    try:
        emu = shared_emulator()
    except EmulatorUnavailable as exc:
        skip_unless_ci(str(exc))
        raise
    settings = Settings(
        data_dir=tmp_path / "data",
        warehouse="bigquery",
        gcp_project=emu.project,
        bigquery_dataset="wh_" + uuid.uuid4().hex[:12],
        bigquery_emulator_host=emu.rest,
        bigquery_emulator_grpc_host=emu.grpc,
    )
    wh = BigQueryWarehouse(settings)

    def read_rows(table: str, columns: list[tuple[str, str]]) -> list[tuple]:
        exprs = []
        for name, typ in columns:
            q = "`" + name + "`"
            if typ == "geography":
                exprs.append(f"ST_ASTEXT({q})")
            elif typ == "record":
                exprs.append(f"TO_JSON_STRING({q})")
            elif typ == "bignumeric":
                exprs.append(f"CAST({q} AS STRING)")
            elif typ == "bytes":
                # emulator quirk only: BYTES do not always round-trip through query results
                exprs.append(f"TO_BASE64({q})")
            else:
                exprs.append(q)
        _, rows = wh.query(f"SELECT {', '.join(exprs)} FROM `{settings.bigquery_dataset}.{table}`")
        return [tuple(normalize_value(typ, v) for (_, typ), v in zip(columns, row)) for row in rows]

    return Backend("bigquery", wh, read_rows, lambda table: f"`{settings.bigquery_dataset}.{table}`")


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
