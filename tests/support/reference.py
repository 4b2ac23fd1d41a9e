"""The reference executor: a planner's steps applied to plain Python rows.

Rows are dicts keyed by lowercased column name with canonical values; a delete removes
the rows equal (`==`, None matching None) to its conditions; an upsert, row by row in
order, removes the rows with its key and appends itself. Tests compare what a plan
leaves against it; the in-memory warehouse stores its tables with it.
"""

from __future__ import annotations

from typing import Any, Iterable

from app.schema.widening import widen_value
from app.warehouse.plan import DeleteRows, InsertRows, UpsertRows, WidenColumns

Row = dict[str, Any]


def inserted_rows(step: InsertRows) -> list[Row]:
    values = step.canonical_values()
    return [{name.lower(): values[name][j] for name, _ in step.columns} for j in range(step.count)]


def remaining_after(step: DeleteRows, rows: list[Row]) -> list[Row]:
    for conds in step.conditions:
        rows = [r for r in rows if not all(r.get(name.lower()) == value for name, _, value in conds)]
    return rows


def upserted(step: UpsertRows, rows: list[Row]) -> list[Row]:
    names = [name.lower() for name, _ in step.key]
    for new in inserted_rows(step.rows):
        key = [new.get(n) for n in names]
        rows = [r for r in rows if [r.get(n) for n in names] != key]
        rows.append(new)
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
        elif isinstance(step, UpsertRows):
            out = upserted(step, out)
    return out


def canon(rows: list[Row]) -> list[tuple]:
    """Rows comparable regardless of order, with absent and None columns alike."""
    return sorted(tuple(sorted((k, repr(v)) for k, v in r.items() if v is not None)) for r in rows)


class ActivityModel:
    """What a table holds after activities, by the contract alone (not the planner): a
    table's key is fixed by its first upsert; an upsert (and an insert on a keyed table)
    removes the rows with its key and appends its row, columns not named NULL; an upsert
    naming another key changes nothing; a delete removes the rows equal on its columns."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.key: list[str] | None = None

    def apply(self, activity: Any) -> None:
        row = {n.lower(): v for n, v in zip(activity.col_names, activity.col_values)}
        if activity.operation == "delete":
            self.rows = [r for r in self.rows if not all(r.get(n) == v for n, v in row.items())]
            return
        key = [k.lower() for k in activity.key] if activity.operation == "upsert" else self.key
        if key is None:
            self.rows.append(row)
            return
        if self.key is None:
            self.key = key
        elif sorted(key) != sorted(self.key):
            return  # refused
        wanted = [row.get(k) for k in self.key]
        self.rows = [r for r in self.rows if [r.get(k) for k in self.key] != wanted]
        self.rows.append(row)
