"""Query results as BigQuery shows them, for `python -m app query` and the admin port.

One rendering for every output format, so a value reads the same in a table, a CSV
cell and a JSON document, and the same whether it came from DuckDB or BigQuery:

- bytes: standard base64 (BigQuery reads BYTES out base64-encoded:
  https://cloud.google.com/bigquery/docs/data-types);
- geography: WKT (DuckDB returns GEOMETRY as WKB);
- non-finite floats: "NaN", "Infinity", "-Infinity" (JSON has no literal for them);
- numeric / bignumeric: plain decimal text without exponent or trailing zeros ("0", "1.5");
- timestamp: "YYYY-MM-DD HH:MM:SS[.ffffff] UTC", the form the BigQuery console and
  `bq extract` write; datetime "YYYY-MM-DDTHH:MM:SS[.ffffff]", date, time in ISO form;
- records (JSON columns): their JSON text, exactly as stored; JSON output embeds it as
  a JSON value. It is never parsed into Python numbers (orjson would turn an integer
  beyond 64 bits into a float).

`render_rows` gives JSON-safe values (str, int, finite float, bool, None);
`cell_text` turns one into the text of a table or CSV cell, `json_value` into a value
of a JSON document. Columns are known by their activity type (`QueryResult.types`,
which each warehouse reads through its own type mapper); None: rendered by value.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from decimal import Decimal
from typing import Any, Sequence

import orjson

NULL_TEXT = "NULL"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_WKT_TAG_SPACE = re.compile(r"([A-Z]) \(")  # "POINT (1 2)" -> "POINT(1 2)", as BigQuery writes WKT


def render_rows(rows: Sequence[Sequence[Any]], column_types: Sequence[str | None] | None) -> list[list[Any]]:
    """Every value of `rows` rendered for its column's activity type (see the module docstring)."""
    types = list(column_types or [])
    types += [None] * (max((len(r) for r in rows), default=0) - len(types))
    return [[render_value(v, t) for v, t in zip(row, types)] for row in rows]


def render_value(value: Any, column_type: str | None = None) -> Any:
    if value is None:
        return None
    if column_type == "record":
        # DuckDB returns JSON columns as their text, BigQuery as the value its client
        # parsed with the standard json module (exact integers), which writes it back.
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if column_type == "geography" and isinstance(value, (bytes, bytearray, memoryview)):
        return wkb_to_wkt(bytes(value))
    return _plain(value)


def _plain(value: Any) -> Any:
    """A JSON-safe rendering of one value by its Python type (nested values included)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # Beyond 64 bits (DuckDB HUGEINT sums) as text: JSON readers would round it.
        return value if _INT64_MIN <= value <= _INT64_MAX else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.isoformat()
        utc = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return utc.isoformat(sep=" ") + " UTC"
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dt.timedelta):  # DuckDB INTERVAL
        return str(value)
    return str(value)


def decimal_text(value: Decimal) -> str:
    """Plain decimal text: no exponent, no trailing fraction zeros, "0" for any zero."""
    if value.is_zero():
        return "0"
    # Not Decimal.normalize(): it rounds to the context's 28 digits.
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def wkb_to_wkt(wkb: bytes) -> str:
    import shapely

    # rounding_precision=-1: every digit stored, not shapely's default 6 decimals.
    text = shapely.to_wkt(shapely.from_wkb(wkb), rounding_precision=-1, trim=True)
    return _WKT_TAG_SPACE.sub(r"\1(", text)


def cell_text(value: Any) -> str:
    """One rendered value as table / CSV text."""
    if value is None:
        return NULL_TEXT
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def json_value(value: Any, column_type: str | None = None) -> Any:
    """One rendered value for a JSON document: a record's text becomes the JSON value itself."""
    if column_type == "record" and isinstance(value, str):
        return orjson.Fragment(value)
    return value
