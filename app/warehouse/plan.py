"""Backend-neutral apply planner, shared by the DuckDB and BigQuery warehouses.

Given a table's current schema and the (not yet applied) envelopes of that table in
order, `plan_table` produces the ordered steps a backend executes:

* `CreateTable` / `AddColumns`: schema changes, merged into ONE step placed before every
  data step. Adding a nullable column earlier gives the same result as adding it where
  the first insert needs it (earlier rows get NULL either way, deletes only name columns
  that already exist, and deletes on a table missing at that point are planned as no-ops
  before the table is created). Hoisting also avoids a DuckDB 1.5 limitation: an ALTER
  after a DELETE of committed rows in the same transaction fails at COMMIT.
* `InsertRows`: a run of consecutive inserts, merged across envelopes and across
  different column sets (union of columns in first-seen order, missing values None),
  built column-major so backends can hand it to Arrow without transposing again.
* `DeleteRows`: one or more consecutive deletes (deletes commute with each other). A
  delete is a barrier: pending inserts before it are emitted first.

Activities that can never apply become `Rejection`s and the rest still apply:
a column whose type differs from the table's, a delete naming a column the table lacks,
malformed activities (length mismatch, invalid name, unknown type, duplicate column, delete without
columns). A delete on a table that does not exist (and is not created earlier in the
same plan) is a counted no-op.

Column names match case-insensitively; the table keeps the spelling that created the
column. Columns created by an earlier activity of the same plan count as existing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Sequence, Union

from app.schema.types import TYPES
from app.warehouse.base import Envelope, Rejection

# The API validates names to this form; the planner re-checks so a backend never has to
# quote anything else (defence in depth: such an activity is rejected, not executed).
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_valid_name = NAME_PATTERN.match

# lowercased column name -> (column name as stored, activity type name)
Schema = dict[str, tuple[str, str]]
Column = tuple[str, str]  # (column name as stored, activity type name)
Condition = tuple[str, str, Any]  # (column name as stored, activity type name, canonical value or None)


@dataclass(slots=True)
class CreateTable:
    columns: list[Column]


@dataclass(slots=True)
class AddColumns:
    columns: list[Column]


@dataclass(slots=True)
class InsertRows:
    columns: list[Column]  # every column that appears in the run, first-seen order
    values: dict[str, list[Any]]  # column name as stored -> `count` values (None where absent)
    count: int


@dataclass(slots=True)
class DeleteRows:
    # One entry per delete activity: the row must match every condition; None matches NULL.
    conditions: list[list[Condition]]


Step = Union[CreateTable, AddColumns, InsertRows, DeleteRows]


@dataclass(slots=True)
class Plan:
    steps: list[Step] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    noop_deletes: int = 0
    schema_changes: int = 0  # tables created + columns added
    rows_to_insert: int = 0
    deletes: int = 0  # delete activities planned (not rows)
    schema: Schema | None = None  # the table's schema after the plan


class _InsertRun:
    """Pending consecutive inserts, kept as segments of activities with the same shape.

    Rows stay as the activities' own value lists until `build`, which transposes each
    segment with C-level `map(itemgetter(i), rows)`: no per-row allocation, so the hot
    path neither allocates nor wakes the cyclic garbage collector.
    """

    __slots__ = ("columns", "col_index", "segments")

    def __init__(self) -> None:
        self.columns: list[Column] = []
        self.col_index: set[str] = set()
        self.segments: list[tuple[tuple[str, ...], list[list[Any]]]] = []

    def new_segment(self, names: tuple[str, ...], columns: tuple[Column, ...]) -> list[list[Any]]:
        for col in columns:
            if col[0] not in self.col_index:
                self.col_index.add(col[0])
                self.columns.append(col)
        rows: list[list[Any]] = []
        self.segments.append((names, rows))
        return rows

    def build(self) -> InsertRows:
        out: dict[str, list[Any]] = {name: [] for name, _ in self.columns}
        total = 0
        single = len(self.segments) == 1
        for names, rows in self.segments:
            n = len(rows)
            total += n
            for i, name in enumerate(names):
                if single:
                    out[name] = list(map(itemgetter(i), rows))
                else:
                    out[name].extend(map(itemgetter(i), rows))
            if len(names) != len(out):
                present = set(names)
                pad = [None] * n
                for name, lst in out.items():
                    if name not in present:
                        lst.extend(pad)
        return InsertRows(columns=self.columns, values=out, count=total)


def type_conflict_reason(column: str, table: str, table_type: str, sent_type: str) -> str:
    return f"column '{column}' is {table_type} in table {table}, activity sends {sent_type}"


def plan_table(table: str, schema: Schema | None, envelopes: Sequence[Envelope]) -> Plan:
    """Plan the envelopes of one table (already-applied envelopes must be left out)."""
    plan = Plan()
    steps = plan.steps
    rejections = plan.rejections
    cur: Schema | None = dict(schema) if schema is not None else None

    run: _InsertRun | None = None
    pending_deletes: list[list[Condition]] | None = None
    # Per-shape resolution cache: (names, types) -> (stored names, columns) or reason str.
    # Safe for the whole plan: the schema only grows and columns never change type.
    insert_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}

    seg_res: Any = None  # resolution of the shape of the open segment of `run`
    seg_rows: list[list[Any]] = []
    last_names: list[str] | None = None  # fast path: same shape as the previous insert
    last_types: list[str] | None = None
    last_res: Any = None

    def flush_inserts() -> None:
        nonlocal run, seg_res
        if run is not None:
            steps.append(run.build())
            run = None
            seg_res = None

    def flush_deletes() -> None:
        nonlocal pending_deletes
        if pending_deletes:
            steps.append(DeleteRows(conditions=pending_deletes))
        pending_deletes = None

    schema_steps: list[Step] = []  # at most one CreateTable or one AddColumns

    def schema_step(new_cols: list[Column], create: bool) -> None:
        if create:
            schema_steps.append(CreateTable(columns=list(new_cols)))
        elif schema_steps:
            schema_steps[0].columns.extend(new_cols)  # type: ignore[union-attr]
        else:
            schema_steps.append(AddColumns(columns=list(new_cols)))

    def resolve_insert(names: tuple[str, ...], types: tuple[str, ...]) -> Any:
        """Resolve a shape against `cur`, applying schema changes; cached per shape."""
        nonlocal cur
        seen: set[str] = set()
        stored: list[str] = []
        new_cols: list[Column] = []
        for name, typ in zip(names, types):
            if name.__class__ is not str or not _valid_name(name):
                return f"invalid column name {name!r}"
            if typ not in TYPES:
                return f"column '{name}' has unknown type {typ!r}"
            low = name.lower()
            if low in seen:
                return f"column '{name}' appears more than once"
            seen.add(low)
            existing = cur.get(low) if cur is not None else None
            if existing is None:
                new_cols.append((name, typ))
                stored.append(name)
            elif existing[1] != typ:
                return type_conflict_reason(existing[0], table, existing[1], typ)
            else:
                stored.append(existing[0])
        if new_cols:
            # Schema steps are hoisted before every data step (see the module docstring).
            if cur is None:
                cur = {}
                schema_step(new_cols, create=True)
            else:
                schema_step(new_cols, create=False)
            for col in new_cols:
                cur[col[0].lower()] = col
        stored_t = tuple(stored)
        return stored_t, tuple(zip(stored_t, types))

    for env in envelopes:
        dedup_id = env.dedup_id
        for index, act in enumerate(env.activities):
            names = act.col_names
            types = act.col_types
            values = act.col_values
            op = act.operation
            if len(names) != len(types) or len(names) != len(values):
                rejections.append(
                    Rejection(dedup_id, index, act, "col_names, col_types and col_values differ in length")
                )
                continue
            if op == "insert":
                if types == last_types and names == last_names:
                    res = last_res
                elif not all(x.__class__ is str for x in (*names, *types)):
                    rejections.append(Rejection(dedup_id, index, act, "col_names and col_types must be strings"))
                    continue
                else:
                    key = (tuple(names), tuple(types))
                    res = insert_cache.get(key)
                    if res is None:
                        if not names:
                            res = "insert without columns"
                        else:
                            res = resolve_insert(key[0], key[1])
                        insert_cache[key] = res
                    last_names, last_types, last_res = names, types, res
                if res is seg_res:
                    seg_rows.append(values)
                    continue
                if res.__class__ is str:
                    rejections.append(Rejection(dedup_id, index, act, res))
                    continue
                if pending_deletes is not None:
                    flush_deletes()
                if run is None:
                    run = _InsertRun()
                seg_rows = run.new_segment(res[0], res[1])
                seg_rows.append(values)
                seg_res = res
            elif op == "delete":
                if not names:
                    rejections.append(Rejection(dedup_id, index, act, "delete without columns would delete every row"))
                    continue
                if cur is None:
                    plan.noop_deletes += 1
                    continue
                conds: list[Condition] = []
                reason = None
                seen: set[str] = set()
                for name, typ, value in zip(names, types, values):
                    if typ.__class__ is not str:
                        reason = "col_types must be strings"
                        break
                    if name.__class__ is not str or not _valid_name(name):
                        reason = f"invalid column name {name!r}"
                        break
                    low = name.lower()
                    if typ not in TYPES:
                        reason = f"column '{name}' has unknown type {typ!r}"
                        break
                    if low in seen:
                        reason = f"column '{name}' appears more than once"
                        break
                    seen.add(low)
                    existing = cur.get(low)
                    if existing is None:
                        reason = f"delete names column '{name}' which table {table} does not have"
                        break
                    if existing[1] != typ:
                        reason = type_conflict_reason(existing[0], table, existing[1], typ)
                        break
                    conds.append((existing[0], typ, value))
                if reason is not None:
                    rejections.append(Rejection(dedup_id, index, act, reason))
                    continue
                flush_inserts()
                if pending_deletes is None:
                    pending_deletes = []
                pending_deletes.append(conds)
                plan.deletes += 1
            else:
                rejections.append(Rejection(dedup_id, index, act, f"unknown operation {op!r}"))
    flush_inserts()
    flush_deletes()
    if schema_steps:
        steps[:0] = schema_steps
    for step in steps:
        if isinstance(step, InsertRows):
            plan.rows_to_insert += step.count
        elif isinstance(step, CreateTable):
            plan.schema_changes += 1
        elif isinstance(step, AddColumns):
            plan.schema_changes += len(step.columns)
    plan.schema = cur
    return plan


# Types whose canonical values (see app.schema.types) are equal in Python exactly when
# the warehouses compare them equal. Not float (NaN), geography (WKT spellings) or
# record (JSON text): a delete on such a column keeps the plan's barriers.
_EXACT_EQUALITY_TYPES = frozenset(
    {"string", "bytes", "integer", "numeric", "bignumeric", "boolean", "timestamp", "date", "time", "datetime"}
)


def coalesce_steps(steps: list[Step]) -> list[Step]:
    """The same plan as at most one `InsertRows` then one `DeleteRows`, when that is equivalent.

    A delete is a barrier only for the rows inserted after it that it would match.
    When no delete matches any row inserted later in the plan (checked exactly, in
    memory, on the canonical values), running every insert first and every delete
    after leaves the same rows: each delete then also sees the rows inserted before it
    (as in order) and no row it must not see. A backlog with a few deletes among many
    inserts then costs two statements instead of two per delete. Otherwise the steps
    are returned unchanged. Schema steps (always first) stay first.
    """
    head = 0
    while head < len(steps) and isinstance(steps[head], (CreateTable, AddColumns)):
        head += 1
    data = steps[head:]
    inserts = [s for s in data if isinstance(s, InsertRows)]
    deletes = [s for s in data if isinstance(s, DeleteRows)]
    if len(inserts) + len(deletes) != len(data) or (len(inserts) <= 1 and len(deletes) <= 1):
        return steps  # nothing to merge (consecutive steps of one kind are merged already)
    later: dict[tuple[str, ...], set[tuple]] = {}
    for step in deletes:
        for conds in step.conditions:
            if any(typ not in _EXACT_EQUALITY_TYPES for _, typ, _ in conds):
                return steps
            later.setdefault(tuple(name for name, _, _ in conds), set())
    for step in reversed(data):
        if isinstance(step, InsertRows):
            for pattern, seen in later.items():
                pad = None
                cols = []
                for name in pattern:
                    col = step.values.get(name)
                    if col is None:
                        pad = pad or [None] * step.count
                        col = pad
                    cols.append(col)
                seen.update(zip(*cols))
        else:
            for conds in step.conditions:
                if tuple(value for _, _, value in conds) in later[tuple(name for name, _, _ in conds)]:
                    return steps
    columns: list[Column] = []
    known: set[str] = set()
    for step in inserts:
        for col in step.columns:
            if col[0] not in known:
                known.add(col[0])
                columns.append(col)
    values: dict[str, list[Any]] = {name: [] for name, _ in columns}
    total = 0
    for step in inserts:
        for name, lst in values.items():
            col = step.values.get(name)
            lst.extend(col if col is not None else [None] * step.count)
        total += step.count
    merged: list[Step] = [InsertRows(columns=columns, values=values, count=total)]
    merged.append(DeleteRows(conditions=[conds for step in deletes for conds in step.conditions]))
    return steps[:head] + merged
