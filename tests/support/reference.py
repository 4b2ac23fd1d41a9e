"""The reference executor: a planner's steps applied to plain Python rows.

Rows are dicts keyed by lowercased column name with canonical values; a delete removes
the rows equal (`==`, None matching None) to its conditions. Tests compare what a plan
leaves against it; the in-memory warehouse stores its tables with it.
"""

from __future__ import annotations

from typing import Any, Iterable

from app.warehouse.plan import DeleteRows, InsertRows, WidenColumns
from app.schema.widening import widen_value

Row = dict[str, Any]


def inserted_rows(step: InsertRows) -> list[Row]:
    values = step.canonical_values()
    return [{name.lower(): values[name][j] for name, _ in step.columns} for j in range(step.count)]


def remaining_after(step: DeleteRows, rows: list[Row]) -> list[Row]:
    for conds in step.conditions:
        rows = [r for r in rows if not all(r.get(name.lower()) == value for name, _, value in conds)]
    return rows


def execute(steps: Iterable[Any], rows: list[Row] | None = None) -> list[Row]:
    """The rows left after `steps` (schema steps add nothing: a missing key reads as None;
    a widened column's values become the wider type's)."""
    out = list(rows or [])
    for step in steps:
        if isinstance(step, WidenColumns):
            for name, old, new in step.columns:
                low = name.lower()
                out = [{**r, low: widen_value(old, new, r.get(low))} for r in out]
        elif isinstance(step, InsertRows):
            out.extend(inserted_rows(step))
        elif isinstance(step, DeleteRows):
            out = remaining_after(step, out)
    return out


def canon(rows: list[Row]) -> list[tuple]:
    """Rows comparable regardless of order, with absent and None columns alike."""
    return sorted(tuple(sorted((k, repr(v)) for k, v in r.items() if v is not None)) for r in rows)
