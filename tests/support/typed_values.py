"""One value set per activity type, with how `python -m app query` renders it (BigQuery's way)."""

from __future__ import annotations

# Every activity type: (column, type, stored canonical value per row, rendering per row).
# Row 2 holds the non-finite floats, row 3 NULLs.
TYPED_COLUMNS = [
    ("s", "string", ["héllo, \"world\"", "x", None], ["héllo, \"world\"", "x", None]),
    ("b", "bytes", ["aGVsbG8=", "AP8=", None], ["aGVsbG8=", "AP8=", None]),
    ("i", "integer", [9223372036854775807, -1, None], [9223372036854775807, -1, None]),
    ("f", "float", [1.5, "NaN", None], [1.5, "NaN", None]),
    ("f2", "float", [0.1, "-Infinity", None], [0.1, "-Infinity", None]),
    ("f3", "float", [-2.0, "Infinity", None], [-2.0, "Infinity", None]),
    ("n", "numeric", ["0", "-12345678901234567890123456789.123456789", None],
     ["0", "-12345678901234567890123456789.123456789", None]),
    ("bn", "bignumeric", ["1.5", "-123456789012345678901234567890.12345678901234567890123456789", None],
     ["1.5", "-123456789012345678901234567890.12345678901234567890123456789", None]),
    ("ok", "boolean", [True, False, None], [True, False, None]),
    ("ts", "timestamp", ["2021-03-30T06:12:44.500000Z", "2021-03-30T06:12:44.000000Z", None],
     ["2021-03-30 06:12:44.500000 UTC", "2021-03-30 06:12:44 UTC", None]),
    ("d", "date", ["2021-03-05", "0001-01-01", None], ["2021-03-05", "0001-01-01", None]),
    ("t", "time", ["06:12:44.250000", "23:59:59", None], ["06:12:44.250000", "23:59:59", None]),
    ("dt", "datetime", ["2021-03-30T06:12:44", "2021-03-30T06:12:44.000001", None],
     ["2021-03-30T06:12:44", "2021-03-30T06:12:44.000001", None]),
    ("g", "geography", ["POINT(1 2)", "LINESTRING(0 0, 1.5 2.25)", None], ["POINT(1 2)", "LINESTRING(0 0, 1.5 2.25)", None]),
    ("r", "record", [{"a": 1, "b": [1.5, "x"], "c": None}, {}, None], [{"a": 1, "b": [1.5, "x"], "c": None}, {}, None]),
]
