"""Whole-column parsing: `column_array` is exact where it answers, and answers the common forms.

The property: for any column of values (the type's valid forms, its near misses, junk,
nulls, as the API decodes them from the wire), `column_array` either declines (None) or
returns exactly the array the per-value rules make (`TYPES[t].normalize`, then
`to_arrow`), and it never answers for a column the per-value rules refuse.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.schema.columnar import to_arrow, to_canonical
from app.schema.types import TYPE_NAMES, TYPES
from app.schema import vectorized
from app.schema.vectorized import column_array
from tests.schema.test_properties import NEAR, VALID, junk, wire

MAX_VALUE_BYTES = 64 * 1024
COLUMN_PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def per_value(type_name: str, values: list[Any]) -> pa.Array | None:
    """What the per-value rules make of the column, or None when they refuse a value."""
    normalize = TYPES[type_name].normalize
    try:
        return to_arrow(type_name, [None if v is None else normalize(v) for v in values])
    except ValueError:
        return None


def assert_same(type_name: str, got: pa.Array, expected: pa.Array) -> None:
    assert got.type == expected.type
    assert to_canonical(type_name, got) == to_canonical(type_name, expected)


@pytest.fixture(params=["few", "many"])
def parse_path(request, monkeypatch):
    """Both ways a text column is converted: Python's ISO parser (few values) and Arrow's cast."""
    if request.param == "many":
        monkeypatch.setattr(vectorized, "_FEW", 0)
    return request.param


def column(type_name: str):
    """Wire values of the type: mostly valid forms, some near misses, junk and nulls."""
    one = st.one_of(
        VALID[type_name].map(lambda p: p[0]),
        VALID[type_name].map(lambda p: p[0]),
        VALID[type_name].map(lambda p: p[0]),
        NEAR[type_name],
        junk.map(lambda p: p[0]),
        st.none(),
    )
    return st.lists(one, min_size=1, max_size=12)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_an_answer_is_exactly_the_per_value_result(type_name, parse_path):
    @COLUMN_PROPS
    @given(column(type_name))
    def check(raw):
        values = wire(raw)
        got = column_array(type_name, values, MAX_VALUE_BYTES)
        expected = per_value(type_name, values)
        if got is not None:
            assert expected is not None, f"{type_name}: took {values!r}, which the per-value rules refuse"
            assert_same(type_name, got, expected)

    check()


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_valid_columns_are_answered_exactly(type_name, parse_path):
    """Columns of valid values only: wherever the fast parser answers, it is exact."""

    @COLUMN_PROPS
    @given(st.lists(VALID[type_name].map(lambda p: p[0]) | st.none(), min_size=1, max_size=12))
    def check(raw):
        values = wire(raw)
        expected = per_value(type_name, values)
        assert expected is not None
        got = column_array(type_name, values, MAX_VALUE_BYTES)
        if got is not None:
            assert_same(type_name, got, expected)

    check()


# The forms the fast parsers must take (the benchmarks' and most clients' forms).
FAST = [
    ("integer", [1, -2, None, 9223372036854775807, -9223372036854775808]),
    ("float", [1.5, -0.0, 3, None, 1e300]),
    ("boolean", [True, False, None]),
    ("string", ["logged in", "", "é", None]),
    ("numeric", ["12345.67", "-0.5", "0", None, "99999999999999999999999999999.999999999"]),
    ("numeric", [1, -5, None]),
    ("datetime", ["2021-03-30 06:12:44", "2021-03-31 00:00:01", None]),
    ("datetime", ["2021-03-30T06:12:44.123456", "2021-03-30 06:12:44.5", "2021-03-30"]),
    ("timestamp", ["2024-05-01T10:00:00Z", "2024-05-02T11:30:00Z", None]),
    ("timestamp", ["2024-05-01T10:00:00.25+05:30", "2024-05-01 10:00:00-08:00"]),
    ("timestamp", ["2024-05-01 10:00:00", "2024-05-01"]),
    ("date", ["2024-02-29", "0001-01-01", "9999-12-31", None]),
    ("time", ["00:00:00", "23:59:59.999999", "12:30:00.5"]),
    ("record", [None, None]),
]


@pytest.mark.parametrize("type_name, values", FAST)
def test_common_forms_take_the_fast_path(type_name, values, parse_path):
    got = column_array(type_name, values, MAX_VALUE_BYTES)
    assert got is not None
    assert_same(type_name, got, per_value(type_name, values))


# Lenient conversions Arrow would make, and forms the per-value rules refuse or read
# differently: each must be declined.
DECLINED = [
    ("integer", [1, True]),  # bool is an int subclass
    ("integer", [2.5]),  # pa.array([2.5], pa.int64()) truncates
    ("integer", [2.0]),  # valid, but a number spelled as a float: the per-value rules decide
    ("integer", [2**63]),
    ("float", [1.5, True]),  # pa.array([True], pa.float64()) is 1.0
    ("float", [2**53 + 1]),  # no double holds it
    ("float", ["1.5"]),
    ("boolean", [1, 0]),
    ("boolean", ["true"]),
    ("string", [1]),
    ("string", ["\ud800"]),
    ("string", ["x" * (MAX_VALUE_BYTES + 1)]),
    ("numeric", [1.5]),
    ("numeric", ["0.0000000001"]),  # 10 fraction digits
    ("numeric", ["1e3"]),
    ("datetime", ["2021-02-29 00:00:00"]),
    ("datetime", ["0000-01-01 00:00:00"]),
    ("datetime", ["2021-03-30 24:00:00"]),
    ("datetime", ["2021-03-30T06:12"]),
    ("datetime", ["2021-03-30T06"]),
    ("datetime", ["2021-03-30 06:12:44Z"]),
    ("datetime", ["2021-03-30 06:12:44.1234567"]),
    ("datetime", ["2021-3-30 06:12:44"]),  # valid, one-digit month: the per-value rules
    ("timestamp", ["0001-01-01T00:00:00+01:00"]),  # before year 1 in UTC
    ("timestamp", ["9999-12-31T23:00:00-01:00"]),  # after year 9999 in UTC
    ("timestamp", ["2024-05-01T10:00:00Z", "2024-05-01T10:00:00"]),  # mixed: the per-value rules
    ("timestamp", [1617084764]),
    ("date", ["2021-13-01"]),
    ("date", ["2021-04-31"]),
    ("date", ["2021-04-01\n2021-04-02"]),
    ("time", ["24:00:00"]),
    ("time", ["23:59:60"]),
    ("time", ["1:02:03"]),
    ("bytes", ["QQ=="]),
    ("geography", ["POINT(1 2)"]),
]


@pytest.mark.parametrize("type_name, values", DECLINED)
def test_lenient_or_unusual_forms_are_declined(type_name, values, parse_path):
    assert column_array(type_name, values, MAX_VALUE_BYTES) is None


def test_float_columns_keep_non_finite_python_floats():
    values = [math.inf, -math.inf, 1.0]
    assert_same("float", column_array("float", values, MAX_VALUE_BYTES), per_value("float", values))
