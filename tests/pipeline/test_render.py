"""Query values rendered as BigQuery shows them, from DuckDB's and BigQuery's Python values."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import orjson
import pytest
import shapely

from app.pipeline.render import cell_text, decimal_text, json_value, render_rows, render_value


@pytest.mark.parametrize(
    "value, expected",
    [(Decimal("0E-9"), "0"), (Decimal("-0E-9"), "0"), (Decimal("1.500000000"), "1.5"), (Decimal("1E+2"), "100"),
     (Decimal("-12345678901234567890123456789.123456789"), "-12345678901234567890123456789.123456789"),
     (Decimal("0.000000001"), "0.000000001")],
)
def test_decimals_are_plain(value, expected):
    assert decimal_text(value) == expected


def test_duckdb_values():
    wkb = shapely.to_wkb(shapely.from_wkt("LINESTRING (0 0, 1.5 2.25)"))
    utc = dt.timezone.utc
    row = [
        b"hello", wkb, '{"a":12345678901234567890123}', float("nan"), float("inf"), float("-inf"), 0.1,
        Decimal("0E-9"), dt.datetime(2021, 3, 30, 6, 12, 44, 500000, tzinfo=utc), dt.datetime(2021, 3, 30, 6, 12, 44),
        dt.date(2021, 3, 5), dt.time(6, 12, 44), True, 2**64, None,
    ]
    types = ["bytes", "geography", "record", "float", "float", "float", "float", "numeric",
             "timestamp", "datetime", "date", "time", "boolean", None, "string"]
    assert render_rows([row], types) == [[
        "aGVsbG8=", "LINESTRING(0 0, 1.5 2.25)", '{"a":12345678901234567890123}', "NaN", "Infinity", "-Infinity", 0.1,
        "0", "2021-03-30 06:12:44.500000 UTC", "2021-03-30T06:12:44", "2021-03-05", "06:12:44", True,
        "18446744073709551616", None,
    ]]


def test_bigquery_values():
    """google-cloud-bigquery returns WKT text, Decimal, bytes and json.loads'ed JSON."""
    tz = dt.timezone(dt.timedelta(hours=2))
    record = json.loads('{"a": 12345678901234567890123, "b": [1.5, "x"]}')
    row = ["POINT(1 2)", record, Decimal("123456789012345678901234567890.12345678901234567890123456789"),
           dt.datetime(2021, 3, 30, 8, 12, 44, tzinfo=tz), b"\x00\xff"]
    rendered = render_rows([row], ["geography", "record", "bignumeric", "timestamp", "bytes"])[0]
    assert rendered == ["POINT(1 2)", '{"a":12345678901234567890123,"b":[1.5,"x"]}',
                        "123456789012345678901234567890.12345678901234567890123456789", "2021-03-30 06:12:44 UTC", "AP8="]


def test_records_stay_exact_in_json_and_text():
    text = '{"a":12345678901234567890123}'
    assert orjson.dumps([json_value(render_value(text, "record"), "record")]) == b'[{"a":12345678901234567890123}]'
    assert cell_text(render_value(text, "record")) == text
    assert json_value("x", "string") == "x"


@pytest.mark.parametrize("value, text", [(None, "NULL"), (True, "true"), (False, "false"), (3, "3"), ([1, "a"], '[1,"a"]')])
def test_cell_text(value, text):
    assert cell_text(value) == text


def test_nested_values_render_too():
    assert render_value([Decimal("1.10"), b"a", float("nan")]) == ["1.1", "YQ==", "NaN"]
    assert render_value({"k": dt.date(2020, 1, 2)}) == {"k": "2020-01-02"}
