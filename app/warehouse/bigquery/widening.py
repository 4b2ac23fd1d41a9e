"""Type widening on BigQuery: `ALTER COLUMN ... SET DATA TYPE`, then the column's description.

BigQuery changes a column's type in place only to a type it coerces to: INT64 to
NUMERIC, BIGNUMERIC or FLOAT64, NUMERIC to BIGNUMERIC or FLOAT64, BIGNUMERIC to FLOAT64,
by DDL; the tables API cannot
(https://cloud.google.com/bigquery/docs/managing-table-schemas#change_a_columns_data_type,
https://cloud.google.com/bigquery/docs/reference/standard-sql/data-definition-language#alter_column_set_data_type_statement).
So the pairs of app.schema.widening this backend widens are those whose column
types (after any type override) are such a coercion. The column description records
the activity type (types.py), so it is patched after the DDL, with the table's etag
(https://cloud.google.com/bigquery/docs/managing-table-schemas#change_a_columns_description).
A retry after the DDL but before the patch skips the DDL (the column has the type already).
"""

from __future__ import annotations

from google.cloud import bigquery

from app.warehouse.bigquery.types import TYPE_DESCRIPTION_PREFIX, TypeMapper
from app.schema.widening import WIDENINGS

# BigQuery column type -> the types ALTER COLUMN SET DATA TYPE takes from it
COERCIONS: dict[str, frozenset[str]] = {
    "INT64": frozenset({"NUMERIC", "BIGNUMERIC", "FLOAT64"}),
    "NUMERIC": frozenset({"BIGNUMERIC", "FLOAT64"}),
    "BIGNUMERIC": frozenset({"FLOAT64"}),
}


def bigquery_widenings(types: TypeMapper) -> frozenset[tuple[str, str]]:
    return frozenset(
        (old, new) for old, new in WIDENINGS
        if types.column_type(new) in COERCIONS.get(types.column_type(old), frozenset())
    )  # fmt: skip


def with_activity_type(field: bigquery.SchemaField, typ: str) -> bigquery.SchemaField:
    """`field` as the server has it, its description naming the activity type `typ`."""
    api = field.to_api_repr()
    api["description"] = TYPE_DESCRIPTION_PREFIX + typ
    return bigquery.SchemaField.from_api_repr(api)
