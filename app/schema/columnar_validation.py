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
from app.schema.validation import (
    OPERATIONS,
    ValidationContext,
    ValueTooLarge,
    shape_cache_key,
    validate_batch,
    validation_context,
)
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

    __slots__ = ("operation", "names", "raw_types", "raw_key", "types", "normalizers", "key_positions", "key", "values")

    def __init__(self, operation: str, names: list, raw_types: list, raw_key: Any, schema: tuple, values: list) -> None:
        self.operation = operation
        self.names = names
        self.raw_types = raw_types
        self.raw_key = raw_key
        self.types, self.normalizers, self.key_positions, self.key = schema
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
    if set(map(type, activities)) != {dict}:
        return None
    sizes = set(map(len, activities))
    if sizes == {5}:
        keys: list[Any] = [None] * len(activities)  # a "key" among five keys: another is missing (KeyError)
    elif sizes <= {5, 6}:
        keys = [a.get("key") for a in activities]
        if any(len(a) != (5 if k is None else 6) for a, k in zip(activities, keys)):
            return None  # an unknown key, or a null key
    else:
        return None
    # KeyError for a missing key: with five keys, all five present means no unknown one
    tables = list(map(_get_table, activities))
    operations = list(map(_get_operation, activities))
    names = list(map(_get_names, activities))
    types = list(map(_get_types, activities))
    values = list(map(_get_values, activities))
    groups = _groups(tables, operations, names, types, keys, values, ctx)
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


def _shape(ctx: ValidationContext, table: Any, operation: str | None, names: list, types: list, key: Any) -> tuple | None:
    """The cached valid shape of an activity, None unless known (or the key fits not the operation)."""
    if operation is None or (operation == "upsert") != (key is not None):
        return None
    return ctx.schemas.get(shape_cache_key(table, names, types, key))


def _groups(
    tables: list, operations: list, names: list, types: list, keys: list, values: list, ctx: ValidationContext
) -> dict[str, list[_Group]] | None:
    """Activities grouped as `runs_of` groups them: per table (first seen first), then
    consecutive ones of one operation, names and types; None unless every column set is
    known valid."""
    n = len(tables)
    first_names, first_types = names[0], types[0]
    if type(first_names) is not list or type(first_types) is not list:
        return None  # (equal to a list is a list, below)
    if (  # one table, one shape: the common request
        tables.count(tables[0]) == n
        and operations.count(operations[0]) == n
        and names.count(first_names) == n
        and types.count(first_types) == n
        and keys.count(keys[0]) == n
    ):
        operation = OPERATIONS.get(operations[0])
        schema = _shape(ctx, tables[0], operation, first_names, first_types, keys[0])
        if operation is None or schema is None:
            return None
        return {tables[0]: [_Group(operation, first_names, first_types, keys[0], schema, values)]}

    groups: dict[str, list[_Group]] = {}
    last: dict[str, _Group] = {}  # each table's latest group
    for table, op, nm, ty, key, vals in zip(tables, operations, names, types, keys, values):
        group = last.get(table)
        # Equal to the group's raw operation, names, types and key: the same, valid, shape.
        if (
            group is not None
            and op == group.operation
            and nm == group.names
            and ty == group.raw_types
            and key == group.raw_key
        ):
            group.values.append(vals)
            continue
        operation = OPERATIONS.get(op)
        if operation is None or type(nm) is not list or type(ty) is not list:
            return None
        schema = _shape(ctx, table, operation, nm, ty, key)
        if schema is None:
            return None
        if (
            group is not None
            and operation == group.operation
            and nm == group.names
            and schema[0] == group.types
            and schema[3] == group.key
        ):
            group.values.append(vals)  # "INTEGER" and "integer" are one type
            continue
        group = last[table] = _Group(operation, nm, ty, key, schema, [vals])
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
    if any(arrays[p].null_count for p in group.key_positions):
        return None  # a null key value: the per-activity rules report it
    key = None if group.key is None else list(group.key)
    return ActivityRun(
        table, group.operation, list(group.names), group.types.copy(), record_batch(group.types, arrays), key
    )
