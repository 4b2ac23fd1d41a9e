"""Canonical values <-> Arrow: lossless both ways, for every type; runs keep order and shape."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.schema.activity import Activity
from app.schema.columnar import ActivityRun, decimal_text, runs_of, to_arrow, to_canonical
from app.schema.types import TYPE_NAMES, TYPES
from tests.schema.test_properties import VALID
from tests.support.typed_values import TYPED_COLUMNS

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("typ", TYPE_NAMES)
@PROPS
@given(data=st.data())
def test_canonical_values_round_trip_through_arrow(typ, data):
    sent = data.draw(st.lists(VALID[typ], min_size=1, max_size=6))
    canonical = [TYPES[typ].normalize(raw) for raw, _ in sent] + [None]
    array = to_arrow(typ, canonical)
    assert array.type == TYPES[typ].arrow_type
    assert to_canonical(typ, array) == canonical


@pytest.mark.parametrize("column", TYPED_COLUMNS, ids=[c[0] for c in TYPED_COLUMNS])
def test_edge_values_round_trip(column):
    _, typ, values, _ = column
    assert to_canonical(typ, to_arrow(typ, values)) == values


def test_arrow_holds_the_typed_value_not_text():
    assert to_arrow("timestamp", ["2021-03-30T06:12:44.500000Z"]).to_pylist()[0].microsecond == 500000
    assert str(to_arrow("numeric", ["-1.5"]).to_pylist()[0]) == "-1.500000000"
    assert to_arrow("bytes", ["AP8="]).to_pylist() == [b"\x00\xff"]
    assert to_arrow("record", [{"b": 1, "a": [2]}]).to_pylist() == ['{"a":[2],"b":1}']


@pytest.mark.parametrize(
    "value, text", [("1.500000000", "1.5"), ("0E-9", "0"), ("-1E-9", "-0.000000001"), ("100.000000000", "100")]
)
def test_decimal_text_is_canonical(value, text):
    from decimal import Decimal

    assert decimal_text(Decimal(value)) == text


def test_runs_group_by_table_and_consecutive_shape_keeping_order():
    a = [
        Activity("insert", "t1", ["id"], ["integer"], [1]),
        Activity("insert", "t2", ["id"], ["integer"], [2]),
        Activity("insert", "t1", ["id"], ["integer"], [3]),
        Activity("delete", "t1", ["id"], ["integer"], [1]),
        Activity("insert", "t1", ["id"], ["integer"], [4]),
        Activity("insert", "t1", ["id", "s"], ["integer", "string"], [5, "x"]),
    ]
    runs = runs_of(a)
    assert [(r.table, r.operation, r.col_names, len(r)) for r in runs] == [
        ("t1", "insert", ["id"], 2),
        ("t1", "delete", ["id"], 1),
        ("t1", "insert", ["id"], 1),
        ("t1", "insert", ["id", "s"], 1),
        ("t2", "insert", ["id"], 1),
    ]
    assert [x for r in runs if r.table == "t1" for x in r.activities()] == [x for x in a if x.table == "t1"]
    assert isinstance(runs[0], ActivityRun) and runs[0].batch.schema.field(0).type == pa.int64()
