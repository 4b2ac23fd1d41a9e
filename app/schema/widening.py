"""Type widening under `evolve`: which activity type a column widens to, as data.

A value of a wider compatible type widens its column in place; a later value of the
narrower type is still accepted (converted to the column's type). The pairs follow
BigQuery's `ALTER COLUMN SET DATA TYPE`, which takes exactly the types a column's type
coerces to: INT64 to NUMERIC, BIGNUMERIC or FLOAT64, NUMERIC to BIGNUMERIC or FLOAT64,
BIGNUMERIC to FLOAT64
(https://cloud.google.com/bigquery/docs/reference/standard-sql/data-definition-language#alter_column_set_data_type_statement,
https://cloud.google.com/bigquery/docs/reference/standard-sql/conversion_rules#comparison_chart).
To an exact type, old values keep their exact value; to `float`, they become the nearest
double, as BigQuery's coercion does.

A backend states the pairs it widens in `Capabilities.widenings` (a subset of these);
the shared planner plans a `WidenColumns` step for them and each backend runs its own
ALTER. Any other type change stays a type conflict.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from app.schema.columnar import to_arrow, to_canonical
from app.schema.types import TYPES

# (column's activity type, the wider activity type it becomes)
WIDENINGS: frozenset[tuple[str, str]] = frozenset({
    ("integer", "numeric"), ("integer", "bignumeric"), ("integer", "float"),
    ("numeric", "bignumeric"), ("numeric", "float"),
    ("bignumeric", "float"),
})  # fmt: skip


def widen_value(from_type: str, to_type: str, value: Any) -> Any:
    """A canonical `from_type` value as the canonical `to_type` value (None stays None)."""
    return None if value is None else TYPES[to_type].normalize(value)


def widen_array(from_type: str, to_type: str, array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An Arrow column of `from_type` as `to_type`'s Arrow type (rare: through canonical values)."""
    return to_arrow(to_type, [widen_value(from_type, to_type, v) for v in to_canonical(from_type, array)])
