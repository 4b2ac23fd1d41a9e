"""Columnar validation at the API edge: JSON body -> `ActivityRun`s, or every problem.

`validate_runs(body, ...)` is exactly `runs_of(validate_batch(body, ...))` with the same
errors for a bad body, but built column by column (`app.schema.vectorized`) without a
Python object per value when the body is well-formed and its values are in the common forms.

It takes the columnar road only for a body every activity of which would take
`validate_batch`'s fast path (well-formed, known-valid column set); it groups the
activities as `runs_of` does and builds each column with `column_array`, or with the
per-value normalizers where that declines. Anything else, an invalid value included,
goes through `validate_batch` (then `runs_of`), the one source of the 4xx details.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from app.schema.columnar import ActivityRun, record_batch, runs_of, to_arrow
from app.schema.validation import OPERATIONS, ValidationContext, ValueTooLarge, validate_batch, validation_context
from app.schema.vectorized import column_array

__all__ = ["validate_runs"]


def validate_runs(
    body: Any,
    *,
    max_activities: int,
    max_columns: int = 10000,
    max_value_bytes: int = 1 << 20,
    max_record_depth: int = 15,
) -> list[ActivityRun]:
    """`runs_of(validate_batch(body, ...))`, built column by column where it can be."""
    ctx = validation_context(max_value_bytes, max_record_depth)
    try:
        runs = _columnar_runs(body, ctx, max_activities, max_columns, max_value_bytes)
    except Exception:  # anything unusual: the per-activity rules decide, and word the errors
        runs = None
    if runs is None:
        return runs_of(
            validate_batch(
                body,
                max_activities=max_activities,
                max_columns=max_columns,
                max_value_bytes=max_value_bytes,
                max_record_depth=max_record_depth,
            )
        )
    return runs


class _Group:
    """Consecutive activities of one table with one operation, names and (lower-case) types."""

    __slots__ = ("operation", "names", "raw_types", "types", "normalizers", "values")

    def __init__(self, operation: str, names: list, raw_types: list, schema: tuple, values: list) -> None:
        self.operation = operation
        self.names = names
        self.raw_types = raw_types
        self.types, self.normalizers = schema
        self.values = values  # each activity's col_values


_get_table = itemgetter("table")
_get_operation = itemgetter("operation")
_get_names = itemgetter("col_names")
_get_types = itemgetter("col_types")
_get_values = itemgetter("col_values")


def _columnar_runs(
    body: Any, ctx: ValidationContext, max_activities: int, max_columns: int, max_value_bytes: int
) -> list[ActivityRun] | None:
    """The runs of a body all of whose activities take `validate_batch`'s fast path, else None."""
    if type(body) is not dict or len(body) != 1:
        return None
    activities = body.get("user_activities")
    if type(activities) is not list or not 0 < len(activities) <= max_activities:
        return None
    if set(map(type, activities)) != {dict} or set(map(len, activities)) != {5}:
        return None
    # KeyError for a missing key: with five keys, all five present means no unknown one
    tables = list(map(_get_table, activities))
    operations = list(map(_get_operation, activities))
    names = list(map(_get_names, activities))
    types = list(map(_get_types, activities))
    values = list(map(_get_values, activities))
    groups = _groups(tables, operations, names, types, values, ctx)
    if groups is None:
        return None
    runs: list[ActivityRun] = []
    for table, table_groups in groups.items():
        for group in table_groups:
            run = _run(table, group, max_columns, max_value_bytes)
            if run is None:
                return None
            runs.append(run)
    return runs


def _groups(
    tables: list, operations: list, names: list, types: list, values: list, ctx: ValidationContext
) -> dict[str, list[_Group]] | None:
    """Activities grouped as `runs_of` groups them: per table (first seen first), then
    consecutive ones of one operation, names and types; None unless every column set is
    known valid."""
    n = len(tables)
    first_names, first_types = names[0], types[0]
    if type(first_names) is not list or type(first_types) is not list:
        return None  # (equal to a list is a list, below)
    schemas_get = ctx.schemas.get
    if (  # one table, one shape: the common request
        tables.count(tables[0]) == n
        and operations.count(operations[0]) == n
        and names.count(first_names) == n
        and types.count(first_types) == n
    ):
        operation = OPERATIONS.get(operations[0])
        schema = schemas_get((tables[0], tuple(first_names), tuple(first_types)))
        if operation is None or schema is None:
            return None
        return {tables[0]: [_Group(operation, first_names, first_types, schema, values)]}

    groups: dict[str, list[_Group]] = {}
    last: dict[str, _Group] = {}  # each table's latest group
    for table, op, nm, ty, vals in zip(tables, operations, names, types, values):
        group = last.get(table)
        # Equal to the group's raw operation, names and types: the same, valid, shape.
        if group is not None and op == group.operation and nm == group.names and ty == group.raw_types:
            group.values.append(vals)
            continue
        operation = OPERATIONS.get(op)
        if operation is None or type(nm) is not list or type(ty) is not list:
            return None
        schema = schemas_get((table, tuple(nm), tuple(ty)))
        if schema is None:
            return None
        if group is not None and operation == group.operation and nm == group.names and schema[0] == group.types:
            group.values.append(vals)  # "INTEGER" and "integer" are one type
            continue
        group = last[table] = _Group(operation, nm, ty, schema, [vals])
        groups.setdefault(table, []).append(group)
    return groups


def _run(table: str, group: _Group, max_columns: int, max_value_bytes: int) -> ActivityRun | None:
    """The group's run, or None when a value is not valid (or over a limit)."""
    n_columns = len(group.types)
    rows = group.values
    if n_columns > max_columns or set(map(type, rows)) != {list} or set(map(len, rows)) != {n_columns}:
        return None
    arrays = []
    for type_name, normalize, column in zip(group.types, group.normalizers, zip(*rows)):
        array = column_array(type_name, column, max_value_bytes)
        if array is None:
            try:
                array = to_arrow(type_name, [None if v is None else normalize(v) for v in column])
            except (ValueError, ValueTooLarge):
                return None
        arrays.append(array)
    return ActivityRun(table, group.operation, list(group.names), group.types.copy(), record_batch(group.types, arrays))
