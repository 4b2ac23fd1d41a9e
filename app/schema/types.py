"""The type-mapping table: one row per activity column type, in one place.

Each row says how a value of that type is validated and normalized at the API edge
(`normalize`, from `app.schema.values`) and which column type it becomes in each
warehouse. Canonical values (what messages carry after `normalize`) are JSON-safe:

| type        | canonical value                                                      |
|-------------|----------------------------------------------------------------------|
| string      | str                                                                  |
| bytes       | str, standard base64 (padded)                                        |
| integer     | int within INT64                                                     |
| float       | float, or the str "NaN" / "Infinity" / "-Infinity" (JSON has none)   |
| numeric     | str, plain decimal, no exponent, <= 29 integer and 9 fraction digits |
| bignumeric  | str, plain decimal, no exponent, <= 38 integer and 38 fraction digits|
| boolean     | bool                                                                 |
| timestamp   | str "YYYY-MM-DDTHH:MM:SS.ffffffZ" in UTC                             |
| date        | str "YYYY-MM-DD"                                                     |
| time        | str "HH:MM:SS" or "HH:MM:SS.ffffff"                                  |
| datetime    | str "YYYY-MM-DDTHH:MM:SS" or with ".ffffff", no zone                  |
| geography   | str WKT (GeoJSON input converted to WKT)                             |
| record      | dict (a JSON object)                                                 |

`None` is allowed for every type and stays `None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from app.schema import values


@dataclass(frozen=True, slots=True)
class TypeSpec:
    name: str
    normalize: Callable[[Any], Any]  # raises ValueError with a message a person can act on
    duckdb_type: str
    bigquery_type: str


TYPES: dict[str, TypeSpec] = {
    spec.name: spec
    for spec in (
        TypeSpec("string", values.normalize_string, "VARCHAR", "STRING"),
        TypeSpec("bytes", values.normalize_bytes, "BLOB", "BYTES"),
        TypeSpec("integer", values.normalize_integer, "BIGINT", "INT64"),
        TypeSpec("float", values.normalize_float, "DOUBLE", "FLOAT64"),
        TypeSpec("numeric", values.normalize_numeric, "DECIMAL(38,9)", "NUMERIC"),
        # DuckDB's DECIMAL stops at 38 digits; BIGNUMERIC needs 76, so DuckDB keeps the
        # canonical decimal text (lossless, compares exactly because it is canonical).
        TypeSpec("bignumeric", values.normalize_bignumeric, "VARCHAR", "BIGNUMERIC"),
        TypeSpec("boolean", values.normalize_boolean, "BOOLEAN", "BOOL"),
        TypeSpec("timestamp", values.normalize_timestamp, "TIMESTAMPTZ", "TIMESTAMP"),
        TypeSpec("date", values.normalize_date, "DATE", "DATE"),
        TypeSpec("time", values.normalize_time, "TIME", "TIME"),
        TypeSpec("datetime", values.normalize_datetime, "TIMESTAMP", "DATETIME"),
        TypeSpec("geography", values.normalize_geography, "GEOMETRY", "GEOGRAPHY"),
        TypeSpec("record", values.normalize_record, "JSON", "JSON"),
    )
}

TYPE_NAMES: tuple[str, ...] = tuple(TYPES)
