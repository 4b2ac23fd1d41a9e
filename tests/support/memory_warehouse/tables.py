"""What the in-memory warehouse stores: per table its schema (as the planner reads it) and
its rows (as the reference executor keeps them), replaced whole on commit."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from app.schema.columnar import to_arrow
from app.warehouse.plan import Schema, arrow_schema
from tests.support.reference import Row


@dataclass(frozen=True, slots=True)
class StoredTable:
    schema: Schema  # lowercased name -> (name as stored, activity type)
    rows: tuple[Row, ...]  # keyed by lowercased name, canonical values

    def column_types(self) -> dict[str, str]:
        return {name: typ for name, typ in self.schema.values()}

    def to_arrow(self) -> pa.Table:
        """The rows as Arrow, each column in its type's `arrow_type` (what the queries read)."""
        columns = list(self.schema.values())
        arrays = [to_arrow(typ, [row.get(name.lower()) for row in self.rows]) for name, typ in columns]
        return pa.Table.from_arrays(arrays, schema=arrow_schema(columns))
