"""The type-mapping table: one row per activity column type, in one place.

Each row says how a value of that type is validated and normalized at the API edge
(`normalize`, from `app.schema.values`) and how messages carry it as Arrow. Which
column type it becomes is each warehouse's own business: its type mapper (see
`app.warehouse.types`).

Accepted forms: exactly BigQuery's JSON-ingestion forms (insertAll and
JSON load jobs) with BigQuery's meaning, including what the official clients send.
Nothing is rounded or truncated: a value that would change is refused.

| type        | accepted (besides null)                                                           |
|-------------|-----------------------------------------------------------------------------------|
| string      | JSON string, valid Unicode                                                        |
| bytes       | standard base64 string, padded                                                    |
| integer     | JSON number with an integer value (42, 1e3, 2.0); string of digits with a sign;   |
|             | within INT64                                                                      |
| float       | JSON number (nearest FLOAT64, as BigQuery); decimal string; [+-]inf, infinity,    |
|             | nan in any letter case ("NaN", "Infinity", str(float)); finite, not underflowing  |
| numeric     | exact decimal as JSON number or string; <= 29 integer and 9 fraction digits       |
| bignumeric  | exact decimal as JSON number or string; <= 38 integer and 38 fraction digits      |
| boolean     | JSON boolean; "true" / "false" in any letter case                                 |
| timestamp   | YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.F]][zone], "/" also separating the date;      |
|             | zone Z, (+|-)H[H][:M[M]] or an IANA name (UTC, America/Los_Angeles), optionally   |
|             | after a space, none = UTC; or epoch seconds as a JSON number. Years 0001-9999 in  |
|             | UTC; fraction digits past the sixth must be 0                                     |
| date        | YYYY-[M]M-[D]D                                                                    |
| time        | [H]H:[M]M:[S]S[.F]                                                                |
| datetime    | YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.F]], no zone                                  |
| geography   | WKT, hex-encoded WKB, GeoJSON geometry (object or text); 2-D, valid, lon/lat      |
| record      | any JSON value but null and a bare string, or JSON text of one (json.dumps);      |
|             | numbers must fit INT64, UINT64 or FLOAT64 exactly (BigQuery JSON, 'exact' mode)   |

Canonical values (what messages carry after `normalize`) are JSON-safe:

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
| geography   | str WKT (GeoJSON and WKB input converted to WKT)                     |
| record      | the decoded JSON value: dict, list, int (INT64 or UINT64), finite    |
|             | float or bool; never a str (a str input is JSON text)                |

`None` is allowed for every type and stays `None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from app.schema import values


@dataclass(frozen=True, slots=True)
class TypeSpec:
    name: str
    normalize: Callable[[Any], Any]  # raises ValueError with a message a person can act on
    # How messages and the warehouses' writers carry the canonical value as Arrow
    # (`app.schema.columnar` converts both ways, losslessly).
    arrow_type: pa.DataType


TYPES: dict[str, TypeSpec] = {
    spec.name: spec
    for spec in (
        TypeSpec("string", values.normalize_string, pa.string()),
        TypeSpec("bytes", values.normalize_bytes, pa.binary()),
        TypeSpec("integer", values.normalize_integer, pa.int64()),
        TypeSpec("float", values.normalize_float, pa.float64()),
        TypeSpec("numeric", values.normalize_numeric, pa.decimal128(38, 9)),
        # The canonical decimal text: BIGNUMERIC needs 76 digits, more than Arrow's
        # decimal128 (BigQuery's writer makes decimal256 of it).
        TypeSpec("bignumeric", values.normalize_bignumeric, pa.string()),
        TypeSpec("boolean", values.normalize_boolean, pa.bool_()),
        TypeSpec("timestamp", values.normalize_timestamp, pa.timestamp("us", tz="UTC")),
        TypeSpec("date", values.normalize_date, pa.date32()),
        TypeSpec("time", values.normalize_time, pa.time64("us")),
        TypeSpec("datetime", values.normalize_datetime, pa.timestamp("us")),
        # geography: WKT text; record: its JSON text with sorted keys.
        TypeSpec("geography", values.normalize_geography, pa.string()),
        TypeSpec("record", values.normalize_record, pa.string()),
    )
}

TYPE_NAMES: tuple[str, ...] = tuple(TYPES)

# The accepted forms of each type in a line, for people (the API docs' per-type examples);
# the docstring's table has them in full.
FORMS: dict[str, str] = {
    "string": "any JSON string (numbers are not stringified)",
    "bytes": "standard padded base64",
    "integer": "a JSON number with an integer value (1e3 is 1000) or a digit string, within INT64",
    "float": "a JSON number, a decimal string, or NaN / Infinity / -Infinity (also inf, nan, any case)",
    "numeric": "exact decimal, up to 29 integer and 9 fraction digits; never rounded",
    "bignumeric": "exact decimal, up to 38 integer and 38 fraction digits; never rounded",
    "boolean": 'true/false, or the strings "true"/"false" in any case',
    "timestamp": "an instant: YYYY-[M]M-[D]D [H]H:[M]M:[S]S[.F] with Z, an offset or a zone name (none means UTC), "
    "or epoch seconds as a JSON number",
    "date": "YYYY-[M]M-[D]D",
    "time": "[H]H:[M]M:[S]S with up to 6 fraction digits",
    "datetime": "wall-clock date and time without a zone, YYYY-[M]M-[D]D[ [H]H:[M]M:[S]S[.F]]",
    "geography": "WKT, hex-encoded WKB, or a GeoJSON geometry (object or string), lon/lat",
    "record": "any JSON value but null and a bare string, or its JSON text (stored as JSON)",
}
assert FORMS.keys() == TYPES.keys()
