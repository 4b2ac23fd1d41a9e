"""Request examples for the OpenAPI docs: one per column type, a delete, the README's batch.

Shown in /docs as the request body's example picker. tests/api/test_openapi.py runs every
one through `validate_batch`, so an example that stops being valid fails the build.
"""

from __future__ import annotations

from typing import Any

from app.schema.types import FORMS


def _insert(table: str, names: list[str], types: list[str], values: list[Any]) -> dict[str, Any]:
    return {"operation": "insert", "table": table, "col_names": names, "col_types": types, "col_values": values}


def _one_type(type_name: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    """An insert into `type_examples` with one column of `type_name` per value, titled with its forms."""
    summary = FORMS[type_name]
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

UPSERT_BATCH: dict[str, Any] = {
    "user_activities": [
        {"operation": "upsert", "table": "users", "col_names": ["user_id", "email", "plan"],
         "col_types": ["integer", "string", "string"], "col_values": [7, "a@example.com", "pro"], "key": ["user_id"]},
        # the same key again: the later row wins; columns not sent become null
        {"operation": "upsert", "table": "users", "col_names": ["user_id", "plan"],
         "col_types": ["integer", "string"], "col_values": [7, "team"], "key": ["user_id"]},
    ]
}

_PER_TYPE = dict(
    (
        _one_type("string", ["logged in", "", None]),
        _one_type("bytes", ["aGVsbG8gd29ybGQ=", "AAEC/w=="]),
        _one_type("integer", [7, "-9223372036854775808", 1e3]),
        _one_type("float", [3.25, "1e-3", "NaN", "-inf"]),
        _one_type("numeric", ["1234.56", 0.1, "-3e2"]),
        _one_type("bignumeric", ["3.14159265358979323846264338327950288419"]),
        _one_type("boolean", [True, "FALSE"]),
        _one_type("timestamp", ["2021-03-30T06:12:44.123456Z", "2021-03-30 08:12:44+02:00", "2021-03-30 06:12:44 UTC",
                                "2021-3-29 23:12:44 America/Los_Angeles", 1617084764.5]),
        _one_type("date", ["2024-02-29", "2024-3-5"]),
        _one_type("time", ["06:12:44", "23:59:59.999999", "6:12:44"]),
        _one_type("datetime", ["2021-03-30 06:12:44", "2021-03-30T06:12:44.5"]),
        _one_type("geography", ["POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))", {"type": "Point", "coordinates": [-0.1276, 51.5072]}]),
        _one_type("record", [{"device": {"os": "ios", "version": "17.4"}, "tags": ["a", "b"]}, [1, 2], '{"plan": "pro"}']),
    )
)

REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "readme": {"summary": "Two inserts (the README example)", "value": README_BATCH},
    "every_type": {"summary": "One insert with a column of each of the 13 types", "value": EVERY_TYPE_BATCH},
    "delete": {
        "summary": "Deletes: rows whose named columns all equal the values (null matches IS NULL)",
        "value": DELETE_BATCH,
    },
    "upsert": {
        "summary": "Upserts: one row per key, the whole row replaced (the first upsert fixes the table's key)",
        "value": UPSERT_BATCH,
    },
    **_PER_TYPE,
}
