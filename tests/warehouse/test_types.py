"""Each backend's type mapper, both ways: activity type <-> column type."""

from __future__ import annotations

import pytest

from app.schema.types import TYPE_NAMES
from app.warehouse.bigquery.types import TypeMapper as BigQueryTypes
from app.warehouse.duckdb import TYPE_MAPPER as DUCKDB_TYPES
from app.warehouse.types import TypeMapper
from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES


@pytest.mark.parametrize(
    "column_type, expected",
    [("TIMESTAMP", "datetime"), ("TIMESTAMPTZ", "timestamp"), ("TIMESTAMP WITH TIME ZONE", "timestamp"),
     ("GEOMETRY", "geography"), ("JSON", "record"), ("BLOB", "bytes"), ("DECIMAL(38,9)", "numeric"),
     ("VARCHAR", "string"), ("varchar", "string"), ("HUGEINT", None), ("DECIMAL(18,3)", None), (None, None)],
)
def test_duckdb_column_types_read_back(column_type, expected) -> None:
    assert DUCKDB_TYPES.activity_type_of(column_type) == expected


@pytest.mark.parametrize(
    "column_type, expected",
    [("TIMESTAMP", "timestamp"), ("DATETIME", "datetime"), ("GEOGRAPHY", "geography"), ("JSON", "record"),
     ("INTEGER", "integer"), ("INT64", "integer"), ("FLOAT", "float"), ("BOOLEAN", "boolean"),
     ("BIGNUMERIC", "bignumeric"), ("RECORD", None), ("INTERVAL", None)],
)
def test_bigquery_column_types_read_back(column_type, expected) -> None:
    assert BigQueryTypes().activity_type_of(column_type) == expected


@pytest.mark.parametrize(
    "mapper, shared",
    [(DUCKDB_TYPES, {"bignumeric": "string"}), (BigQueryTypes(), {}),
     (BigQueryTypes(EMULATOR_TYPE_OVERRIDES), {"bignumeric": "string"})],
    ids=["duckdb", "bigquery", "bigquery-emulator"],
)
def test_every_activity_type_round_trips_but_the_shared_ones(mapper, shared) -> None:
    for typ in TYPE_NAMES:
        assert mapper.activity_type_of(mapper.column_type(typ)) == shared.get(typ, typ), typ
    assert mapper.shared == set(shared)


def test_a_mapper_must_declare_the_types_it_stores_in_another_types_column() -> None:
    columns = {typ: typ.upper() for typ in TYPE_NAMES} | {"bignumeric": "STRING"}
    with pytest.raises(ValueError, match="bignumeric"):
        TypeMapper(columns)
    with pytest.raises(ValueError, match="numeric"):
        TypeMapper({typ: typ.upper() for typ in TYPE_NAMES}, shared={"numeric"})
    assert TypeMapper(columns, shared={"bignumeric"}).shared == {"bignumeric"}


def test_a_mapper_missing_an_activity_type_is_refused() -> None:
    with pytest.raises(ValueError, match="out of date.*record"):
        TypeMapper({typ: "TEXT" for typ in TYPE_NAMES if typ != "record"})
