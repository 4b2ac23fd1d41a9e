"""What replaying an activity would change in its table as the table is now.

A replay publishes old activities at the end of the stream, after everything that
applied since they failed (and Pub/Sub does not promise order once a message went
through a dead-letter topic). So before a replay, each activity is compared with the
table's current rows, through the warehouse's read-only `query` with bound values:

- a delete would remove the rows matching it now, rows written after the failure too;
- an insert whose values are already in the table (written again since) would add an
  older copy after them.

Only columns of types that compare equal the same way in every warehouse (string,
integer, boolean) are compared; a delete compared on fewer columns than it names counts
at most what it would remove. A delete that ran since the failure leaves no row behind,
so an insert it would have removed cannot be seen here: the replay brings it back.
"""

from __future__ import annotations

from typing import Any, Callable

from app.schema.activity import Activity
from app.schema.identifiers import check_column_name, check_table_name

COMPARED_TYPES = frozenset({"string", "integer", "boolean"})

CountRows = Callable[[str, list[Any]], int]  # (sql, params) -> the count it selects


def compared_columns(activity: Activity, columns: dict[str, str]) -> list[tuple[str, Any]]:
    """(column as the table names it, value) for the activity's columns that can be
    compared: in the table with the same type, of a compared type, a valid identifier."""
    by_lower = {name.lower(): (name, typ) for name, typ in columns.items()}
    out = []
    for name, typ, value in zip(activity.col_names, activity.col_types, activity.col_values):
        stored = by_lower.get(name.lower())
        if stored is None or stored[1] != typ or typ not in COMPARED_TYPES or check_column_name(stored[0]) is not None:
            continue
        out.append((stored[0], value))
    return out


def matching_sql(table: str, compared: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """A count of `table`'s rows equal on `compared`; names validated, values bound."""
    if check_table_name(table) is not None:
        raise ValueError(f"not a table name: {table!r}")
    where = " AND ".join(f"{name} IS NULL" if value is None else f"{name} = ?" for name, value in compared)
    params = [value for _, value in compared if value is not None]
    return f"SELECT count(*) AS n FROM {table}" + (f" WHERE {where}" if where else ""), params


def what_it_would_change(activity: Activity, columns: dict[str, str] | None, count: CountRows) -> str | None:
    """What replaying `activity` would overwrite or duplicate in its table now; None: nothing."""
    if columns is None:
        return None  # no table yet: the replay creates it
    compared = compared_columns(activity, columns)
    shown = ", ".join(f"{name}={value!r}" for name, value in compared)
    if activity.operation == "delete":
        sql, params = matching_sql(activity.table, compared)
        n = count(sql, params)
        if n == 0:
            return None
        bound = "up to " if len(compared) < len(activity.col_names) else ""
        return (f"would delete {bound}{n} row(s) of {activity.table} as it is now ({shown or 'every row'}), "
                "rows written after the failure included")
    if not compared:
        return None
    sql, params = matching_sql(activity.table, compared)
    n = count(sql, params)
    if n == 0:
        return None
    return (f"{activity.table} already holds {n} row(s) with these values ({shown}), written since: "
            "the replay would add an older copy after them")
