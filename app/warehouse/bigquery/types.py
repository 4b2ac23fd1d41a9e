"""BigQuery's type mapper: each activity type's column type (both ways), and what
BigQuery's clients need per type: the one Arrow type BigQuery takes in another
physical form (BIGNUMERIC as decimal256(76, 38), from the canonical decimal text), the
converters of canonical values to query parameters, and how a delete compares a column
with a bound parameter.

One code path: Google's types. A `TypeOverride` keeps one activity type in another
column type; only tests declare one, for a local stand-in that cannot hold Google's
BIGNUMERIC (see `tests/support`).
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from google.cloud import bigquery

from app.schema.types import TYPES
from app.warehouse import types as mapping

TYPE_DESCRIPTION_PREFIX = "activity type: "
COLUMN_TYPES: dict[str, str] = {
    "string": "STRING",
    "bytes": "BYTES",
    "integer": "INT64",
    "float": "FLOAT64",
    "numeric": "NUMERIC",
    "bignumeric": "BIGNUMERIC",
    "boolean": "BOOL",
    "timestamp": "TIMESTAMP",
    "date": "DATE",
    "time": "TIME",
    "datetime": "DATETIME",
    "geography": "GEOGRAPHY",
    "record": "JSON",
}
# legacy SQL names the tables API and query results report for GoogleSQL types
_LEGACY_NAMES = {"INTEGER": "integer", "FLOAT": "float", "BOOLEAN": "boolean"}


def b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def timestamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.timezone.utc)


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class BigQueryType:
    """How one activity type is written and compared in BigQuery (column type: COLUMN_TYPES).

    `convert` turns a canonical value into what query parameters take (None: as is);
    `param_convert` overrides it where the parameter type differs. Rows are sent in
    `TYPES[...].arrow_type` unless `arrow_type` says otherwise.
    """

    convert: Callable[[Any], Any] | None
    param_type: str  # query parameter type in deletes
    compare: str = "{column} = @{param}"
    param_convert: Callable[[Any], Any] | None = None
    arrow_type: pa.DataType | None = None  # None: TYPES[...].arrow_type
    value: str = "{value}"  # the column's value from a bound row parameter (upserts)
    row_param_type: str | None = None  # a row parameter's type, the canonical value as is (None: param_type)


_BIGQUERY_TYPES: dict[str, BigQueryType] = {
    "string": BigQueryType(None, "STRING"),
    # upserted rows carry bytes as base64 text: a form bqemulator also reads inside a struct
    "bytes": BigQueryType(b64, "BYTES", row_param_type="STRING", value="FROM_BASE64({value})"),
    "integer": BigQueryType(None, "INT64"),
    "float": BigQueryType(float, "FLOAT64"),  # "NaN" / "Infinity" parse too
    "numeric": BigQueryType(Decimal, "NUMERIC"),
    # the Storage Write API takes BIGNUMERIC as decimal256(76, 38)
    # (https://cloud.google.com/bigquery/docs/supported-data-types, "Supported Apache Arrow data types")
    "bignumeric": BigQueryType(Decimal, "BIGNUMERIC", arrow_type=pa.decimal256(76, 38)),
    "boolean": BigQueryType(None, "BOOL"),
    "timestamp": BigQueryType(timestamp, "TIMESTAMP"),
    "date": BigQueryType(dt.date.fromisoformat, "DATE"),
    "time": BigQueryType(dt.time.fromisoformat, "TIME"),
    "datetime": BigQueryType(dt.datetime.fromisoformat, "DATETIME"),
    "geography": BigQueryType(  # WKT
        None, "STRING", "ST_EQUALS({column}, ST_GEOGFROMTEXT(@{param}))", value="ST_GEOGFROMTEXT({value})"
    ),
    "record": BigQueryType(  # JSON text
        json_text, "STRING", "TO_JSON_STRING({column}) = TO_JSON_STRING(PARSE_JSON(@{param}))", value="PARSE_JSON({value})"
    ),
}
if set(_BIGQUERY_TYPES) != set(TYPES):  # pragma: no cover - caught by any import in tests
    raise RuntimeError(f"BigQuery type mapper out of date: {sorted(set(TYPES) ^ set(_BIGQUERY_TYPES))}")


@dataclass(frozen=True, slots=True)
class TypeOverride:
    """One activity type kept in `column_type` (another type's column) instead of Google's."""

    column_type: str
    bigquery_type: BigQueryType


TypeOverrides = Mapping[str, TypeOverride]


class TypeMapper(mapping.TypeMapper):
    """Activity type <-> BigQuery column, Arrow array, insertAll JSON, delete condition."""

    def __init__(self, overrides: TypeOverrides | None = None) -> None:
        overrides = dict(overrides or {})
        super().__init__(
            {**COLUMN_TYPES, **{t: o.column_type for t, o in overrides.items()}},
            aliases=_LEGACY_NAMES,
            shared=set(overrides),
        )
        self._types = {**_BIGQUERY_TYPES, **{t: o.bigquery_type for t, o in overrides.items()}}

    def field(self, name: str, typ: str) -> bigquery.SchemaField:
        """A user column; its description records the activity type so it maps back exactly."""
        return bigquery.SchemaField(
            name, self.column_type(typ), mode="NULLABLE", description=TYPE_DESCRIPTION_PREFIX + typ
        )

    def activity_type(self, field: bigquery.SchemaField) -> str:
        desc = field.description or ""
        if desc.startswith(TYPE_DESCRIPTION_PREFIX):
            typ = desc[len(TYPE_DESCRIPTION_PREFIX) :].strip()
            if typ in TYPES:
                return typ
        if field.mode == "REPEATED" or field.field_type in ("RECORD", "STRUCT"):
            return "record"
        return self.activity_type_of(field.field_type) or "string"

    def result_type(self, field: bigquery.SchemaField) -> str | None:
        """The activity type of a query result's column; None for arrays and structs."""
        if field.mode == "REPEATED":
            return None
        return self.activity_type_of(field.field_type)

    # ----------------------------------------------------------------- Storage Write (Arrow)

    def arrow_type(self, typ: str) -> pa.DataType:
        return self._types[typ].arrow_type or TYPES[typ].arrow_type

    def arrow_column(self, typ: str, column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """A column in `TYPES[typ].arrow_type` as BigQuery takes it (cast only where it differs)."""
        target = self.arrow_type(typ)
        return column if column.type == target else pc.cast(column, target)

    # ----------------------------------------------------------------- insertAll (JSON)

    @staticmethod
    def json_value(typ: str, value: Any) -> Any:
        """Canonical forms are what insertAll expects (base64 bytes, decimal text, ...)."""
        if value is None:
            return None
        if typ == "record":
            return json_text(value)
        if typ == "float" and isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return value

    # ----------------------------------------------------------------- query parameters

    def param(self, name: str | None, typ: str, value: Any) -> bigquery.ScalarQueryParameter:
        """A canonical value as a bound parameter (upserts' rows)."""
        spec = self._types[typ]
        if spec.row_param_type is not None:
            return bigquery.ScalarQueryParameter(name, spec.row_param_type, value)
        convert = spec.param_convert or spec.convert
        if value is not None and convert is not None:
            value = convert(value)
        return bigquery.ScalarQueryParameter(name, spec.param_type, value)

    def value_sql(self, typ: str, expr: str) -> str:
        """The column value of `typ` from `expr`, a parameter made by `param`."""
        return self._types[typ].value.format(value=expr)

    # ----------------------------------------------------------------- deletes

    def condition(self, column_sql: str, typ: str, value: Any, param: str, params: list) -> str:
        """SQL matching `column_sql` against `value`, appending its bound parameter to `params`."""
        if value is None:
            return f"{column_sql} IS NULL"
        spec = self._types[typ]
        if typ == "float" and math.isnan(float(value)):
            return f"IS_NAN({column_sql})"
        convert = spec.param_convert or spec.convert
        params.append(
            bigquery.ScalarQueryParameter(param, spec.param_type, value if convert is None else convert(value))
        )
        return spec.compare.format(column=column_sql, param=param)


def positional_param(value: Any) -> bigquery.ScalarQueryParameter:
    """A `?` parameter of `Warehouse.query`, typed from the Python value."""
    P = bigquery.ScalarQueryParameter
    if value is None:
        return P(None, "STRING", None)
    if isinstance(value, bool):
        return P(None, "BOOL", value)
    if isinstance(value, int):
        return P(None, "INT64", value)
    if isinstance(value, float):
        return P(None, "FLOAT64", value)
    if isinstance(value, Decimal):
        return P(None, "NUMERIC", value)
    if isinstance(value, (bytes, bytearray)):
        return P(None, "BYTES", bytes(value))
    if isinstance(value, dt.datetime):
        return P(None, "TIMESTAMP" if value.tzinfo else "DATETIME", value)
    if isinstance(value, dt.date):
        return P(None, "DATE", value)
    if isinstance(value, dt.time):
        return P(None, "TIME", value)
    return P(None, "STRING", str(value))
