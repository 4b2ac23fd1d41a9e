"""DuckDB's type mapper: each activity type's column type, and how it is written and compared.

Values arrive as Arrow in `TYPES[t].arrow_type`, which DuckDB scans natively for every
type but two: GEOMETRY from WKT and JSON from its text, done in SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.schema.columnar import to_arrow
from app.warehouse.types import TypeMapper

COLUMN_TYPES: dict[str, str] = {
    "string": "VARCHAR",
    "bytes": "BLOB",
    "integer": "BIGINT",
    "float": "DOUBLE",
    "numeric": "DECIMAL(38,9)",
    # DECIMAL stops at 38 digits and BIGNUMERIC needs 76: the canonical decimal text
    # (lossless, and compares exactly because it is canonical).
    "bignumeric": "VARCHAR",
    "boolean": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",  # an instant
    "date": "DATE",
    "time": "TIME",
    "datetime": "TIMESTAMP",  # wall-clock, no zone
    "geography": "GEOMETRY",  # VARCHAR (WKT) where the spatial extension cannot load
    "record": "JSON",
}

# How DuckDB spells the column types back (information_schema, query descriptions).
TYPE_MAPPER = TypeMapper(COLUMN_TYPES, aliases={"TIMESTAMP WITH TIME ZONE": "timestamp"}, shared={"bignumeric"})


@dataclass(frozen=True, slots=True)
class DuckType:
    """How one activity type is stored and compared in DuckDB.

    `value_sql` / `compare_value_sql` turn a staged column or bound parameter (`{}`) into
    the column type; `compare_column_sql` is applied to the stored column in deletes.
    """

    sql_type: str
    value_sql: str = "{}"
    compare_column_sql: str = "{}"
    compare_value_sql: str | None = None  # default: value_sql

    def cmp_value(self, placeholder: str) -> str:
        return (self.compare_value_sql or self.value_sql).format(placeholder)


def duck_types(spatial: bool) -> dict[str, DuckType]:
    """How each activity type is stored and compared.

    Geography is GEOMETRY with the spatial extension, else its canonical WKT as VARCHAR.
    """
    table = {name: DuckType(sql_type) for name, sql_type in COLUMN_TYPES.items()}
    if spatial:
        # GEOMETRY equality compares the WKB, so "POINT(1 2)" matches "POINT (1 2)".
        table["geography"] = DuckType(COLUMN_TYPES["geography"], value_sql="ST_GeomFromText({})")
    else:
        table["geography"] = DuckType(COLUMN_TYPES["string"])
    json = COLUMN_TYPES["record"]
    table["record"] = DuckType(
        json,
        value_sql=f"CAST({{}} AS {json})",
        compare_column_sql="CAST({} AS VARCHAR)",
        compare_value_sql=f"CAST(CAST({{}} AS {json}) AS VARCHAR)",
    )
    return table


def key_param(typ: str, value: Any) -> Any:
    """A canonical value as a bound parameter: the Python value of its Arrow form
    (Decimal, datetime, bytes, ...), which DuckDB binds as the column's type."""
    return to_arrow(typ, [value])[0].as_py()
