"""Request examples for the OpenAPI docs: one per column type, a delete, the README's batch.

Shown in /docs as the request body's example picker. tests/api/test_openapi.py runs every
one through `validate_batch`, so an example that stops being valid fails the build.
"""

from __future__ import annotations

from typing import Any


def _insert(table: str, names: list[str], types: list[str], values: list[Any]) -> dict[str, Any]:
    return {"operation": "insert", "table": table, "col_names": names, "col_types": types, "col_values": values}


def _one_type(type_name: str, summary: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    """An insert into `type_examples` with one column of `type_name` per value."""
    names = [f"{type_name}_{i}" for i in range(1, len(values) + 1)]
    activity = _insert("type_examples", ["id", *names], ["integer", *[type_name] * len(values)], [1, *values])
    return f"type_{type_name}", {"summary": f"{type_name}: {summary}", "value": {"user_activities": [activity]}}


README_BATCH: dict[str, Any] = {
    "user_activities": [
        _insert("user_activities_table", ["user_id", "event_type_id", "detail", "occured_at"],
                ["integer", "integer", "string", "datetime"], [1, 2, "logged in", "2021-03-30 06:12:44"]),
        _insert("user_activities_table", ["user_id", "event_type_id", "detail", "occured_at"],
                ["integer", "integer", "string", "datetime"], [2, 5, "changed password", "2021-03-30 06:14:02"]),
    ]
}

EVERY_TYPE_BATCH: dict[str, Any] = {
    "user_activities": [
        _insert(
            "all_types",
            ["s", "b", "i", "f", "n", "bn", "ok", "ts", "d", "t", "dt", "g", "r"],
            ["string", "bytes", "integer", "float", "numeric", "bignumeric", "boolean", "timestamp", "date",
             "time", "datetime", "geography", "record"],
            ["héllo", "aGVsbG8=", 42, 1.5, "12.345", "123456789012345678901234567890.123456789", True,
             "2024-05-01T12:00:00Z", "2024-05-01", "12:30:00", "2024-05-01T12:30:00", "POINT(13.4 52.5)",
             {"plan": "pro", "seats": 3}],
        )
    ]
}

DELETE_BATCH: dict[str, Any] = {
    "user_activities": [
        {"operation": "delete", "table": "user_activities_table", "col_names": ["user_id", "event_type_id"],
         "col_types": ["integer", "integer"], "col_values": [1, 2]},
        # null matches rows where the column IS NULL
        {"operation": "delete", "table": "user_activities_table", "col_names": ["detail"],
         "col_types": ["string"], "col_values": [None]},
    ]
}

_PER_TYPE = dict(
    (
        _one_type("string", "any JSON string (numbers are not stringified)", ["logged in", "", None]),
        _one_type("bytes", "standard padded base64", ["aGVsbG8gd29ybGQ=", "AAEC/w=="]),
        _one_type("integer", "a JSON number with an integer value (1e3 is 1000) or a digit string, within INT64",
                  [7, "-9223372036854775808", 1e3]),
        _one_type("float", "a JSON number, a decimal string, or NaN / Infinity / -Infinity (also inf, nan, any case)",
                  [3.25, "1e-3", "NaN", "-inf"]),
        _one_type("numeric", "exact decimal, up to 29 integer and 9 fraction digits; never rounded",
                  ["1234.56", 0.1, "-3e2"]),
        _one_type("bignumeric", "exact decimal, up to 38 integer and 38 fraction digits",
                  ["3.14159265358979323846264338327950288419"]),
        _one_type("boolean", "true/false, or the strings \"true\"/\"false\" in any case", [True, "FALSE"]),
        _one_type("timestamp", "an instant: BigQuery's format with Z, an offset or a zone name (none means UTC), "
                  "or epoch seconds", ["2021-03-30T06:12:44.123456Z", "2021-03-30 08:12:44+02:00",
                                      "2021-03-30 06:12:44 UTC", "2021-3-29 23:12:44 America/Los_Angeles", 1617084764.5]),
        _one_type("date", "YYYY-[M]M-[D]D", ["2024-02-29", "2024-3-5"]),
        _one_type("time", "[H]H:[M]M:[S]S with up to 6 fraction digits", ["06:12:44", "23:59:59.999999", "6:12:44"]),
        _one_type("datetime", "wall-clock date and time without a zone", ["2021-03-30 06:12:44", "2021-03-30T06:12:44.5"]),
        _one_type("geography", "WKT, hex-encoded WKB, or a GeoJSON geometry (object or string), lon/lat",
                  ["POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))", {"type": "Point", "coordinates": [-0.1276, 51.5072]}]),
        _one_type("record", "any JSON value but null and a bare string, or its JSON text (stored as JSON)",
                  [{"device": {"os": "ios", "version": "17.4"}, "tags": ["a", "b"]}, [1, 2], '{"plan": "pro"}']),
    )
)

REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "readme": {"summary": "Two inserts (the README example)", "value": README_BATCH},
    "every_type": {"summary": "One insert with a column of each of the 13 types", "value": EVERY_TYPE_BATCH},
    "delete": {
        "summary": "Deletes: rows whose named columns all equal the values (null matches IS NULL)",
        "value": DELETE_BATCH,
    },
    **_PER_TYPE,
}
