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
  different column sets (union of columns in first-seen order, NULL where a row lacks
  one) into one Arrow table the backends append as it is.
* `DeleteRows`: one or more consecutive deletes (deletes commute with each other). A
  delete is a barrier: pending inserts before it are emitted first.
* `UpsertRows`: a run of consecutive upserts (and inserts on a keyed table, which are
  upserts on its key), merged as inserts are; the backend replaces every row with one
  of their keys by the LAST row of that key (`UpsertRows.last_per_key`). Upserts, inserts
  and deletes are barriers to each other.

Keys (upserts, only with `plan_table(..., upserts=True)`: the backend says it applies
them; elsewhere an upsert is rejected). A table's key is `Schema.key`; the first upsert
on a table without one fixes it (`Plan.new_key`, and `CreateTable.key` when the plan
creates the table and has inserted nothing into it before: the backend declares it).
An upsert naming another key, a key column of an inexact type, or a row with a NULL key
value is rejected; so is an insert on a keyed table that lacks a key column.

A v2 envelope (columnar `runs`) is planned run by run: a run's shape is checked once
and its record batch becomes part of the Arrow table without a Python object per
value; only delete runs (few rows) become canonical values. A v1 envelope
(`activities`) is planned activity by activity and its columns converted with
`app.schema.columnar.to_arrow`. Both give the same steps and rejections.

Activities that can never apply become `Rejection`s and the rest still apply:
a column whose type differs from the table's, a delete naming a column the table lacks,
malformed activities (length mismatch, invalid name, unknown type, duplicate column, delete without
columns). A delete on a table that does not exist (and is not created earlier in the
same plan) is a counted no-op.

Column names match case-insensitively; the table keeps the spelling that created the
column. Columns created by an earlier activity of the same plan count as existing.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc

from app.schema.activity import KEY_TYPES, Activity
from app.schema.identifiers import IDENTIFIER
from app.schema.columnar import ActivityRun, to_arrow, to_canonical
from app.schema.types import TYPES
from app.warehouse.base import Envelope, Rejection, TypeConflict
from app.schema.widening import widen_array, widen_value

# The API validates names to this form; the planner re-checks so a backend never has to
# quote anything else (defence in depth: such an activity is rejected, not executed).
_valid_name = IDENTIFIER.match

Column = tuple[str, str]  # (column name as stored, activity type name)


class Schema(dict[str, Column]):
    """Lowercased column name -> (column name as stored, activity type name), and `key`:
    the table's key columns as stored, fixed by its first upsert (None: no key)."""

    __slots__ = ("key",)

    def __init__(self, columns: Any = (), key: Sequence[str] | None = None) -> None:
        super().__init__(columns)
        self.key: tuple[str, ...] | None = tuple(key) if key else None


def table_key(schema: dict | None) -> tuple[str, ...] | None:
    """A schema's key; a plain dict (a backend that keeps no keys) has none."""
    return getattr(schema, "key", None)

Condition = tuple[str, str, Any]  # (column name as stored, activity type name, canonical value or None)
Source = tuple[str, int, int]  # (dedup_id, index of the first activity in its envelope, rows)

LENGTH_MISMATCH = "col_names, col_types and col_values differ in length"


@dataclass(slots=True)
class CreateTable:
    columns: list[Column]
    key: tuple[str, ...] | None = None  # declare this key (the table's first rows are upserts)


@dataclass(slots=True)
class AddColumns:
    columns: list[Column]


@dataclass(slots=True)
class WidenColumns:
    """Columns whose type widens in place (app.schema.widening): (name as stored, from, to)."""

    columns: list[tuple[str, str, str]]


SCHEMA_STEPS = (CreateTable, AddColumns, WidenColumns)


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    """The Arrow schema of `InsertRows.table` for these columns (types from `TYPES`)."""
    return pa.schema([pa.field(name, TYPES[typ].arrow_type) for name, typ in columns])


class RowPart:
    """Consecutive inserted rows of one shape: a run's record batch (v2), or activities'
    value lists (v1, converted to Arrow by `InsertRows.column`, many parts at once)."""

    __slots__ = ("columns", "_index", "batch", "_arrays", "rows")

    def __init__(
        self, columns: tuple[Column, ...], batch: pa.RecordBatch | None = None, rows: list[list[Any]] | None = None
    ) -> None:
        self.columns = columns
        self._index = {name: i for i, (name, _) in enumerate(columns)}
        self.batch = batch
        self._arrays = batch.columns if batch is not None else []
        self.rows = rows  # v1: appended to by the planner

    def __len__(self) -> int:
        return self.batch.num_rows if self.batch is not None else len(self.rows or ())

    def type_of(self, name: str) -> str | None:
        """The type this part carries the column `name` in (None if it lacks it)."""
        i = self._index.get(name)
        return None if i is None else self.columns[i][1]

    def array(self, name: str, arrow_type: pa.DataType) -> pa.Array:
        """v2: the column stored as `name` (NULL if this part lacks it)."""
        i = self._index.get(name)
        return pa.nulls(len(self), arrow_type) if i is None else self._arrays[i]

    def values(self, name: str) -> list[Any]:
        """v1: the column stored as `name` as the activities' values (None if this part lacks it)."""
        i = self._index.get(name)
        rows = self.rows or []
        # C-level `map(itemgetter(i), rows)`: no per-row allocation
        return [None] * len(rows) if i is None else list(map(itemgetter(i), rows))


class InsertRows:
    """A run of consecutive inserts, as Arrow: `table` has one column per `columns` entry
    (every column that appears in the run, first-seen order), named as stored, typed
    `TYPES[type].arrow_type`, NULL where an activity did not name the column.

    Built lazily from its parts (one per run or shape), so merging steps costs nothing.
    `sources` says where the rows come from, in row order: (dedup_id, first index, rows).
    """

    __slots__ = ("columns", "parts", "sources", "_columns")

    def __init__(self, columns: list[Column], parts: list[RowPart], sources: list[Source]) -> None:
        self.columns = columns
        self.parts = parts
        self.sources = sources
        self._columns: dict[str, pa.ChunkedArray] = {}

    def __repr__(self) -> str:
        return f"InsertRows(columns={self.columns!r}, count={self.count})"

    @property
    def count(self) -> int:
        return sum(n for _, _, n in self.sources)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column in Arrow: v2 parts' arrays as they are; consecutive v1 parts' values
        converted together (one `to_arrow` call, not one per part)."""
        done = self._columns.get(name)
        if done is not None:
            return done
        typ = next((t for stored, t in self.columns if stored == name), None)
        if typ is None:
            raise KeyError(name)
        arrow_type = TYPES[typ].arrow_type
        chunks: list[pa.Array] = []
        pending: list[Any] = []
        for part in self.parts:
            sent = part.type_of(name)
            narrower = sent is not None and sent != typ  # a value of a type the column widened from
            if part.batch is None and not narrower:
                pending.extend(part.values(name))
                continue
            if pending:
                chunks.append(to_arrow(typ, pending))
                pending = []
            if part.batch is None:
                assert sent is not None
                chunks.append(to_arrow(typ, [widen_value(sent, typ, v) for v in part.values(name)]))
            elif narrower:
                assert sent is not None
                chunks.append(widen_array(sent, typ, part.array(name, TYPES[sent].arrow_type)))
            else:
                chunks.append(part.array(name, arrow_type))
        if pending:
            chunks.append(to_arrow(typ, pending))
        self._columns[name] = column = pa.chunked_array(chunks, arrow_type)
        return column

    @property
    def table(self) -> pa.Table:
        return pa.Table.from_arrays([self.column(name) for name, _ in self.columns], schema=arrow_schema(self.columns))

    def column_values(self, name: str) -> list[Any]:
        """One column as canonical values (None where absent); for paths that need Python values."""
        for stored, typ in self.columns:
            if stored == name:
                return to_canonical(typ, self.column(name))
        return [None] * self.count

    def canonical_values(self) -> dict[str, list[Any]]:
        """Column name as stored -> canonical values (insertAll, tests)."""
        return {name: self.column_values(name) for name, _ in self.columns}

    def source_rows(self) -> list[tuple[str, int]]:
        """(dedup_id, index in its envelope) of each row, in order."""
        return [(dedup_id, first + i) for dedup_id, first, n in self.sources for i in range(n)]

    def dedup_ids(self) -> pa.Array:
        """The dedup_id of each row, as an Arrow string array."""
        return pa.array(list(chain.from_iterable(repeat(d, n) for d, _, n in self.sources)), pa.string())


def merge_columns(steps: Sequence[InsertRows]) -> list[Column]:
    """The union of the steps' columns, first-seen order."""
    columns: list[Column] = []
    known: set[str] = set()
    for step in steps:
        for col in step.columns:
            if col[0] not in known:
                known.add(col[0])
                columns.append(col)
    return columns


@dataclass(slots=True)
class DeleteRows:
    # One entry per delete activity: the row must match every condition; None matches NULL.
    conditions: list[list[Condition]]


class UpsertRows:
    """A run of consecutive upserts on `key` (columns as stored), rows in order: after it,
    the table holds, for each key among the rows, exactly the last row of that key."""

    __slots__ = ("key", "rows")

    def __init__(self, key: tuple[Column, ...], rows: InsertRows) -> None:
        self.key = key
        self.rows = rows

    def __repr__(self) -> str:
        return f"UpsertRows(key={self.key!r}, columns={self.columns!r}, count={self.count})"

    @property
    def columns(self) -> list[Column]:
        return self.rows.columns

    @property
    def count(self) -> int:
        return self.rows.count

    def last_per_key(self) -> pa.Table:
        """The rows as `InsertRows.table`, only the last of each key kept (in Arrow)."""
        table = self.rows.table
        if table.num_rows < 2:
            return table
        return table.take(self.last_rows())

    def last_rows(self) -> pa.Array:
        """The positions of each key's last row, in row order."""
        table = self.rows.table
        order = pa.array(range(table.num_rows), pa.int64())
        if table.num_rows < 2:
            return order
        names = [name for name, _ in self.key]
        last = table.select(names).append_column(_ROW, order).group_by(names, use_threads=False).aggregate([(_ROW, "max")])
        kept = last.column(_ROW + "_max")
        return pc.take(kept, pc.sort_indices(kept)).combine_chunks()


_ROW = "__row"  # not a valid column name: cannot clash with the table's


Step = Union[CreateTable, AddColumns, WidenColumns, InsertRows, DeleteRows, UpsertRows]


@dataclass(slots=True)
class Plan:
    steps: list[Step] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    noop_deletes: int = 0
    schema_changes: int = 0  # tables created + columns added + columns widened
    columns_widened: int = 0
    rows_to_insert: int = 0
    rows_to_upsert: int = 0  # upserts planned (rows sent, not rows replaced)
    deletes: int = 0  # delete activities planned (not rows)
    schema: Schema | None = None  # the table's schema after the plan
    new_key: tuple[str, ...] | None = None  # the key the plan fixes (the table had none)


# A resolved insert shape: (stored names, columns), or the reason it can never apply.
Resolution = Union[tuple[tuple[str, ...], tuple[Column, ...]], str]
# A resolved upsert shape: (stored names, columns, key positions in them), or the reason.
UpsertResolution = Union[tuple[tuple[str, ...], tuple[Column, ...], tuple[int, ...]], str]
NO_UPSERTS = "this warehouse does not apply upserts"


class _InsertRun:
    """Pending consecutive inserts: their columns, parts and sources, until a barrier."""

    __slots__ = ("columns", "col_index", "parts", "sources")

    def __init__(self) -> None:
        self.columns: list[Column] = []
        self.col_index: set[str] = set()
        self.parts: list[RowPart] = []
        self.sources: list[Source] = []

    def _add_columns(self, columns: tuple[Column, ...]) -> None:
        for col in columns:
            if col[0] not in self.col_index:
                self.col_index.add(col[0])
                self.columns.append(col)

    def new_rows(self, columns: tuple[Column, ...]) -> list[list[Any]]:
        self._add_columns(columns)
        rows: list[list[Any]] = []
        self.parts.append(RowPart(columns, rows=rows))
        return rows

    def add_batch(self, columns: tuple[Column, ...], batch: pa.RecordBatch) -> None:
        self._add_columns(columns)
        self.parts.append(RowPart(columns, batch=batch))

    def add_source(self, dedup_id: str, index: int, n: int) -> None:
        sources = self.sources
        if sources:
            last = sources[-1]
            if last[0] == dedup_id and last[1] + last[2] == index:
                sources[-1] = (dedup_id, last[1], last[2] + n)
                return
        sources.append((dedup_id, index, n))

    def build(self) -> InsertRows:
        return InsertRows(columns=self.columns, parts=self.parts, sources=self.sources)


def type_conflict_reason(column: str, table: str, table_type: str, sent_type: str) -> TypeConflict:
    return TypeConflict.of(column, table, table_type, sent_type)


class _Planner:
    """The state of one `plan_table` call; v1 activities and v2 runs feed the same steps."""

    def __init__(
        self, table: str, schema: dict[str, Column] | None, upserts: bool, widenings: frozenset[tuple[str, str]] = frozenset()
    ) -> None:
        self.table = table
        self.widenings = widenings  # (column type, wider type) pairs the backend widens in place
        self.widened: dict[str, tuple[str, str, str]] = {}  # lower name -> (name, type before the plan, type now)
        self.retyped = False  # a value was sent in another type than its column's final one
        self.plan = Plan()
        self.cur: Schema | None = Schema(schema, table_key(schema)) if schema is not None else None
        self.upserts = upserts
        # The table's key as (stored name, type) columns; None: not keyed (yet).
        self.key: tuple[Column, ...] | None = None
        if self.cur is not None and self.cur.key and all(k.lower() in self.cur for k in self.cur.key):
            self.key = tuple(self.cur[k.lower()] for k in self.cur.key)
        self.created: CreateTable | None = None  # the table, when this plan creates it
        self.inserted = False  # a plain insert was planned (a created table then declares no key)
        self.upsert_cache: dict[tuple, UpsertResolution] = {}
        self.run: _InsertRun | None = None
        self.run_upserts = False  # whether `run` is a run of upserts
        self.pending_deletes: list[list[Condition]] | None = None
        self.schema_steps: list[Step] = []  # at most one CreateTable or one AddColumns
        # Per-shape resolution cache: (names, types) -> Resolution. Safe for the whole
        # plan: the schema only grows, and a column only widens (a resolved shape's
        # values are converted to the final type: `finish`, `InsertRows.column`).
        self.insert_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], Resolution] = {}
        # v1: (insert run, resolution, rows) of the part activities are appended to
        self.rows_part: tuple[_InsertRun | None, Any, list[list[Any]]] = (None, None, [])

    # -- steps ----------------------------------------------------------------------------

    def flush_inserts(self) -> None:
        if self.run is not None and self.run.sources:  # (every row of a run may have been rejected)
            rows = self.run.build()
            self.plan.steps.append(UpsertRows(self.key, rows) if self.run_upserts else rows)  # type: ignore[arg-type]
        self.run = None

    def flush_deletes(self) -> None:
        if self.pending_deletes:
            self.plan.steps.append(DeleteRows(conditions=self.pending_deletes))
        self.pending_deletes = None

    def insert_run(self, upserts: bool = False) -> _InsertRun:
        """The pending run of inserts, or of upserts (a delete or a run of the other kind
        before it is a barrier: emitted first)."""
        if self.pending_deletes is not None:
            self.flush_deletes()
        if self.run is not None and self.run_upserts != upserts:
            self.flush_inserts()
        if self.run is None:
            self.run = _InsertRun()
            self.run_upserts = upserts
        self.inserted = self.inserted or not upserts
        return self.run

    def add_deletes(self, conditions: list[list[Condition]]) -> None:
        self.flush_inserts()
        if self.pending_deletes is None:
            self.pending_deletes = []
        self.pending_deletes.extend(conditions)
        self.plan.deletes += len(conditions)

    def schema_step(self, new_cols: list[Column], create: bool) -> None:
        if create:
            self.created = CreateTable(columns=list(new_cols))
            self.schema_steps.append(self.created)
        elif self.schema_steps:
            self.schema_steps[0].columns.extend(new_cols)  # type: ignore[union-attr]
        else:
            self.schema_steps.append(AddColumns(columns=list(new_cols)))

    def finish(self) -> Plan:
        self.flush_inserts()
        self.flush_deletes()
        plan = self.plan
        if self.retyped:
            self._to_widened_types()
        if self.schema_steps:
            plan.steps[:0] = self.schema_steps
        for step in plan.steps:
            if isinstance(step, InsertRows):
                plan.rows_to_insert += step.count
            elif isinstance(step, UpsertRows):
                plan.rows_to_upsert += step.count
            elif isinstance(step, CreateTable):
                plan.schema_changes += 1
            elif isinstance(step, (AddColumns, WidenColumns)):
                plan.schema_changes += len(step.columns)
                if isinstance(step, WidenColumns):
                    plan.columns_widened += len(step.columns)
        plan.schema = self.cur
        return plan

    # -- widening (app.schema.widening) ---------------------------------------------------

    def widen(self, widenings: list[tuple[str, str, str]]) -> None:
        """Widen columns (name as stored, from, to): in the schema step that creates them, else
        in the plan's one `WidenColumns` step (hoisted with the schema steps)."""
        cur = self.cur
        assert cur is not None
        for name, old, new in widenings:
            low = name.lower()
            cur[low] = (name, new)
            created = self.schema_steps[0].columns if self.schema_steps else []  # type: ignore[union-attr]
            position = next((i for i, (n, _) in enumerate(created) if n == name), None)
            if position is not None:
                created[position] = (name, new)
            else:
                first = self.widened.get(low, (name, old, new))[1]
                self.widened[low] = (name, first, new)

    def _to_widened_types(self) -> None:
        """Every data step in the columns' final types (the widening runs before all of them)."""
        cur = self.cur
        assert cur is not None
        if self.widened:
            self.schema_steps.append(WidenColumns(columns=list(self.widened.values())))
        for step in self.plan.steps:
            if isinstance(step, InsertRows):
                step.columns = [(name, cur[name.lower()][1]) for name, _ in step.columns]
            elif isinstance(step, UpsertRows):
                step.rows.columns = [(name, cur[name.lower()][1]) for name, _ in step.rows.columns]
                step.key = tuple((name, cur[name.lower()][1]) for name, _ in step.key)
            elif isinstance(step, DeleteRows):
                step.conditions = [
                    [(name, cur[name.lower()][1], widen_value(typ, cur[name.lower()][1], value) if typ != cur[name.lower()][1] else value)
                     for name, typ, value in conds]
                    for conds in step.conditions
                ]  # fmt: skip

    # -- shapes ---------------------------------------------------------------------------

    def resolve_insert(self, names: Sequence[Any], types: Sequence[Any]) -> Resolution:
        """Resolve an insert shape against the schema, applying schema changes; cached."""
        if not all(x.__class__ is str for x in (*names, *types)):
            return "col_names and col_types must be strings"
        key = (tuple(names), tuple(types))
        res = self.insert_cache.get(key)
        if res is None:
            res = self._resolve_insert(*key) if names else "insert without columns"
            self.insert_cache[key] = res
        return res

    def _resolve_insert(self, names: tuple[str, ...], types: tuple[str, ...]) -> Resolution:
        cur = self.cur
        seen: set[str] = set()
        stored: list[str] = []
        new_cols: list[Column] = []
        widenings: list[tuple[str, str, str]] = []
        for name, typ in zip(names, types):
            if not _valid_name(name):
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
                if (existing[1], typ) in self.widenings:
                    widenings.append((existing[0], existing[1], typ))
                elif (typ, existing[1]) not in self.widenings:  # else: a narrower value, converted
                    return type_conflict_reason(existing[0], self.table, existing[1], typ)
                self.retyped = True
                stored.append(existing[0])
            else:
                stored.append(existing[0])
        if widenings:
            self.widen(widenings)
        if new_cols:
            # Schema steps are hoisted before every data step (see the module docstring).
            if cur is None:
                cur = self.cur = Schema()
                self.schema_step(new_cols, create=True)
            else:
                self.schema_step(new_cols, create=False)
            for col in new_cols:
                cur[col[0].lower()] = col
        stored_t = tuple(stored)
        return stored_t, tuple(zip(stored_t, types))

    def resolve_upsert(self, names: Sequence[Any], types: Sequence[Any], key: Sequence[Any] | None) -> UpsertResolution:
        """Resolve an upsert shape (`key` None: an insert on the keyed table), applying
        schema changes and fixing the table's key; cached (the key, once fixed, stays)."""
        if not all(x.__class__ is str for x in (*names, *types)):
            return "col_names and col_types must be strings"
        cache_key = (tuple(names), tuple(types), None if key is None else tuple(key))
        res = self.upsert_cache.get(cache_key)
        if res is None:
            res = self.upsert_cache[cache_key] = self._resolve_upsert(names, types, key)
        return res

    def _resolve_upsert(self, names: Sequence[str], types: Sequence[str], key: Sequence[Any] | None) -> UpsertResolution:
        if not self.upserts:
            return NO_UPSERTS
        sent = {name.lower(): typ for name, typ in zip(names, types)}
        if key is None:  # an insert on the keyed table
            assert self.key is not None
            wanted = [name for name, _ in self.key]
            missing = [name for name in wanted if name.lower() not in sent]
            if missing:
                return (f"table {self.table} has the key ({', '.join(wanted)}): an insert on it is an upsert "
                        f"and must send column '{missing[0]}'")
        else:
            reason = self._key_problem(key, sent)
            if reason is not None:
                return reason
            wanted = list(key)
        res = self.resolve_insert(names, types)  # after the checks: a rejected shape adds no column
        if isinstance(res, str):
            return res
        stored, columns = res
        if self.key is None:
            self._fix_key(wanted)
        lowered = [name.lower() for name in stored]
        assert self.key is not None
        return stored, columns, tuple(lowered.index(name.lower()) for name, _ in self.key)

    def _key_problem(self, key: Sequence[Any], sent: dict[str, str]) -> str | None:
        """Why an upsert's key can never apply to this table, or None."""
        if key.__class__ is not list or not key or not all(k.__class__ is str for k in key):
            return "an upsert needs a key: a non-empty list of its column names"
        lowered = [k.lower() for k in key]
        if len(set(lowered)) != len(lowered):
            return "a key column appears more than once"
        for name, low in zip(key, lowered):
            typ = sent.get(low)
            if typ is None:
                return f"key column '{name}' is not among the upsert's columns"
            if typ not in KEY_TYPES:
                return f"key column '{name}' is {typ}, which does not compare exactly (not float, record or geography)"
        if self.key is not None:
            have = [name for name, _ in self.key]
            if set(lowered) != {name.lower() for name in have}:
                if set(lowered) > {name.lower() for name in have}:
                    return (f"adding a column to the key of table {self.table} is refused: its key is "
                            f"({', '.join(have)}), the upsert names ({', '.join(key)})")
                return (f"table {self.table} has the key ({', '.join(have)}); an upsert naming another "
                        f"key ({', '.join(key)}) is refused")
        return None

    def _fix_key(self, names: Sequence[str]) -> None:
        """The first upsert fixes the table's key (declared if this plan creates the table
        and has inserted nothing into it yet)."""
        cur = self.cur
        assert cur is not None
        self.key = tuple(cur[name.lower()] for name in names)
        stored = tuple(name for name, _ in self.key)
        cur.key = stored
        self.plan.new_key = stored
        if self.created is not None and not self.inserted:
            self.created.key = stored

    def resolve_delete(self, names: Sequence[Any], types: Sequence[Any]) -> tuple[Column, ...] | str:
        """The stored columns a delete shape names, or the reason it can never apply (`cur` exists)."""
        cur = self.cur
        assert cur is not None
        columns: list[Column] = []
        seen: set[str] = set()
        for name, typ in zip(names, types):
            if typ.__class__ is not str:
                return "col_types must be strings"
            if name.__class__ is not str or not _valid_name(name):
                return f"invalid column name {name!r}"
            low = name.lower()
            if typ not in TYPES:
                return f"column '{name}' has unknown type {typ!r}"
            if low in seen:
                return f"column '{name}' appears more than once"
            seen.add(low)
            existing = cur.get(low)
            if existing is None:
                return f"delete names column '{name}' which table {self.table} does not have"
            if existing[1] != typ and (typ, existing[1]) not in self.widenings:
                return type_conflict_reason(existing[0], self.table, existing[1], typ)
            columns.append((existing[0], existing[1]))  # a narrower value: converted to the column's type
        return tuple(columns)

    # -- v1: activities -------------------------------------------------------------------

    def add_activities(self, dedup_id: str, activities: list[Activity]) -> None:
        rejections = self.plan.rejections
        # the open row part of `self.run` (it continues across envelopes) and its shape
        seg_run, seg_res, seg_rows = self.rows_part
        last_names: list[str] | None = None  # fast path: same shape as the previous insert
        last_types: list[str] | None = None
        last_res: Any = None
        for index, act in enumerate(activities):
            names = act.col_names
            types = act.col_types
            values = act.col_values
            op = act.operation
            if len(names) != len(types) or len(names) != len(values):
                rejections.append(Rejection(dedup_id, index, act, LENGTH_MISMATCH))
                continue
            if op == "upsert" or (op == "insert" and self.key is not None):
                key = act.key if op == "upsert" else None
                ures = self.resolve_upsert(names, types, key)
                if ures.__class__ is str:
                    rejections.append(Rejection(dedup_id, index, act, ures))  # type: ignore[arg-type]
                    continue
                null = next((p for p in ures[2] if values[p] is None), None)  # type: ignore[index]
                if null is not None:
                    rejections.append(Rejection(dedup_id, index, act, f"key column '{ures[1][null][0]}' is null"))  # type: ignore[index]
                    continue
                if ures is not seg_res or self.run is not seg_run:
                    seg_run = self.insert_run(upserts=True)
                    seg_rows = seg_run.new_rows(ures[1])  # type: ignore[arg-type]
                    seg_res = ures
                seg_rows.append(values)
                seg_run.add_source(dedup_id, index, 1)  # type: ignore[union-attr]
            elif op == "insert":
                if types == last_types and names == last_names:
                    res = last_res
                else:
                    res = self.resolve_insert(names, types)
                    last_names, last_types, last_res = names, types, res
                if res.__class__ is not tuple:  # a reason (str or TypeConflict)
                    rejections.append(Rejection(dedup_id, index, act, res))
                    continue
                if res is not seg_res or self.run is not seg_run:
                    seg_run = self.insert_run()
                    seg_rows = seg_run.new_rows(res[1])
                    seg_res = res
                seg_rows.append(values)
                seg_run.add_source(dedup_id, index, 1)  # type: ignore[union-attr]
            elif op == "delete":
                conds = self._delete_conditions(dedup_id, index, act, names, types, [values])
                if conds is not None:
                    self.add_deletes(conds)
            else:
                rejections.append(Rejection(dedup_id, index, act, f"unknown operation {op!r}"))
        self.rows_part = (seg_run, seg_res, seg_rows)

    def _delete_conditions(
        self,
        dedup_id: str,
        first: int,
        acts: Activity | ActivityRun,
        names: Sequence[Any],
        types: Sequence[Any],
        rows: Sequence[Sequence[Any]] | None,
    ) -> list[list[Condition]] | None:
        """The conditions of delete activities of one shape; None after rejecting them or
        counting them as no-ops. `rows` None: take the values from the run `acts`."""
        if not names:
            self._reject(dedup_id, first, acts, "delete without columns would delete every row")
            return None
        if self.cur is None:
            self.plan.noop_deletes += 1 if isinstance(acts, Activity) else len(acts)
            return None
        res = self.resolve_delete(names, types)
        if isinstance(res, str):
            self._reject(dedup_id, first, acts, res)
            return None
        if rows is None:
            assert isinstance(acts, ActivityRun)
            mismatch = _arrow_mismatch(names, types, acts.batch)
            if mismatch is not None:
                self._reject(dedup_id, first, acts, mismatch)
                return None
            rows = list(zip(*acts.column_values()))
        if any(typ != sent for (_, typ), sent in zip(res, types)):
            return [
                [(name, typ, widen_value(sent, typ, value) if typ != sent else value)
                 for (name, typ), sent, value in zip(res, types, row)]
                for row in rows
            ]  # fmt: skip
        return [[(name, typ, value) for (name, typ), value in zip(res, row)] for row in rows]

    def _reject(self, dedup_id: str, first: int, acts: Activity | ActivityRun, reason: str) -> None:
        """Reject one activity, or every activity of a run (materialized only here)."""
        listed = [acts] if isinstance(acts, Activity) else acts.activities()
        self.plan.rejections.extend(Rejection(dedup_id, first + i, a, reason) for i, a in enumerate(listed))

    # -- v2: runs -------------------------------------------------------------------------

    def add_runs(self, dedup_id: str, runs: list[ActivityRun]) -> None:
        first = 0
        for run in runs:
            self.add_run(dedup_id, first, run)
            first += len(run)

    def add_run(self, dedup_id: str, first: int, run: ActivityRun) -> None:
        names, types, batch = run.col_names, run.col_types, run.batch
        if len(run) == 0:
            return
        if len(names) != len(types) or len(names) != batch.num_columns:
            self._reject(dedup_id, first, run, LENGTH_MISMATCH)
            return
        if run.operation == "upsert" or (run.operation == "insert" and self.key is not None):
            self.add_upsert_run(dedup_id, first, run)
        elif run.operation == "insert":
            # checked first: a rejected run must not add columns
            mismatch = _arrow_mismatch(names, types, batch)
            res = self.resolve_insert(names, types) if mismatch is None else mismatch
            if isinstance(res, str):
                self._reject(dedup_id, first, run, res)
                return
            target = self.insert_run()
            target.add_batch(res[1], batch)
            target.add_source(dedup_id, first, len(run))
            self.rows_part = (None, None, [])  # v1 rows after this batch start a new part
        elif run.operation == "delete":
            conds = self._delete_conditions(dedup_id, first, run, names, types, None)
            if conds is not None:
                self.add_deletes(conds)
        else:
            self._reject(dedup_id, first, run, f"unknown operation {run.operation!r}")


    def add_upsert_run(self, dedup_id: str, first: int, run: ActivityRun) -> None:
        names, types, batch = run.col_names, run.col_types, run.batch
        mismatch = _arrow_mismatch(names, types, batch)
        res = self.resolve_upsert(names, types, run.key if run.operation == "upsert" else None) if mismatch is None else mismatch
        if isinstance(res, str):
            self._reject(dedup_id, first, run, res)
            return
        _, columns, positions = res
        nulls: pa.Array | None = None
        for p in positions:
            if batch.column(p).null_count:
                is_null = batch.column(p).is_null()
                nulls = is_null if nulls is None else pc.or_(nulls, is_null)
        target = self.insert_run(upserts=True)
        self.rows_part = (None, None, [])  # v1 rows after this batch start a new part
        if nulls is None:
            target.add_batch(columns, batch)
            target.add_source(dedup_id, first, len(run))
            return
        bad = pc.indices_nonzero(nulls).to_pylist()
        by_position = {p: columns[p][0] for p in positions}
        listed = ActivityRun(run.table, run.operation, names, types, batch.take(pa.array(bad, pa.int64())), run.key).activities()
        for row, act in zip(bad, listed):
            column = next(by_position[p] for p in positions if act.col_values[p] is None)
            self.plan.rejections.append(Rejection(dedup_id, first + row, act, f"key column '{column}' is null"))
        start = 0
        for end in [*bad, len(run)]:  # the valid rows between the null ones, in order
            if end > start:
                target.add_batch(columns, batch.slice(start, end - start))
                target.add_source(dedup_id, first + start, end - start)
            start = end + 1


def _arrow_mismatch(names: Sequence[str], types: Sequence[str], batch: pa.RecordBatch) -> str | None:
    """A run's column that is not in its type's Arrow type (a malformed message), if any."""
    if all(t.__class__ is str for t in types) and batch.schema.types == _expected_arrow_types(tuple(types)):
        return None  # the common case, checked once per shape
    for name, typ, arrow in zip(names, types, batch.schema.types):
        spec = TYPES.get(typ) if typ.__class__ is str else None
        if spec is not None and arrow != spec.arrow_type:
            return f"column '{name}' carries Arrow {arrow}, {typ} is {TYPES[typ].arrow_type}"
    return None


@functools.lru_cache(maxsize=1024)
def _expected_arrow_types(types: tuple[str, ...]) -> list[pa.DataType] | None:
    if not all(t in TYPES for t in types):
        return None
    return [TYPES[t].arrow_type for t in types]


def plan_table(
    table: str,
    schema: dict[str, Column] | None,
    envelopes: Sequence[Envelope],
    widenings: frozenset[tuple[str, str]] = frozenset(),
    *,
    upserts: bool = False,
) -> Plan:
    """Plan the envelopes of one table (already-applied envelopes must be left out).

    `widenings`: the (column type, wider type) pairs the backend widens in place
    (`Capabilities.widenings`); without them every type change is a conflict.
    `upserts`: the backend applies `UpsertRows` (else every upsert is rejected)."""
    planner = _Planner(table, schema, upserts, widenings)
    for env in envelopes:
        runs = env.runs
        if runs is not None:
            planner.add_runs(env.dedup_id, runs)
        else:
            planner.add_activities(env.dedup_id, env.activities)
    return planner.finish()


# Types whose canonical values (see app.schema.types) are equal in Python exactly when
# the warehouses compare them equal. Not float (NaN), geography (WKT spellings) or
# record (JSON text): a delete on such a column keeps the plan's barriers.
_EXACT_EQUALITY_TYPES = frozenset(
    {"string", "bytes", "integer", "numeric", "bignumeric", "boolean", "timestamp", "date", "time", "datetime"}
)


def _matches_a_later_insert(
    inserts: list[tuple[int, InsertRows]], key_columns: tuple[Column, ...], first_delete: dict[tuple, int]
) -> bool:
    """Whether a row inserted at step position q equals a key first deleted at a position < q.

    `inserts`: (step position, step); `first_delete`: key -> position of its first delete.
    One key column (the common case) is matched in Arrow over every inserted row at once
    (`index_in`); only the matching rows, as few as the deletes, are looked at in Python.
    """
    if len(key_columns) > 1:
        for pos, step in inserts:
            names = {name for name, _ in step.columns}
            columns = [step.column_values(n) if n in names else [None] * step.count for n, _ in key_columns]
            if any(first_delete.get(row, pos) < pos for row in zip(*columns)):
                return True
        return False
    name, typ = key_columns[0]
    arrow_type = TYPES[typ].arrow_type
    chunks: list[pa.Array] = []
    starts: list[int] = []  # first row of each insert step
    total = 0
    for _, step in inserts:
        starts.append(total)
        total += step.count
        if any(stored == name for stored, _ in step.columns):
            chunks.extend(step.column(name).chunks)
        else:
            chunks.append(pa.nulls(step.count, arrow_type))
    keys = list(first_delete)
    found = pc.index_in(pa.chunked_array(chunks, arrow_type), value_set=to_arrow(typ, [k[0] for k in keys]), skip_nulls=False)
    rows = pc.indices_nonzero(pc.is_valid(found))
    for row, key in zip(rows.to_pylist(), pc.take(found, rows).to_pylist()):
        if first_delete[keys[key]] < inserts[bisect_right(starts, row) - 1][0]:
            return True
    return False


def coalesce_steps(steps: list[Step]) -> list[Step]:
    """The same plan as at most one `InsertRows` then one `DeleteRows`, when that is equivalent.

    A delete is a barrier only for the rows inserted after it that it would match.
    When no delete matches any row inserted later in the plan (checked exactly, in
    memory, on the key columns only: Arrow's `is_in` for one key column), running every insert
    first and every delete after leaves the same rows: each delete then also sees the
    rows inserted before it (as in order) and no row it must not see. A backlog with a
    few deletes among many inserts then costs two statements instead of two per delete.
    Otherwise the steps are returned unchanged. Schema steps (always first) stay first.
    """
    head = 0
    while head < len(steps) and isinstance(steps[head], SCHEMA_STEPS):
        head += 1
    data = steps[head:]
    inserts = [s for s in data if isinstance(s, InsertRows)]
    deletes = [s for s in data if isinstance(s, DeleteRows)]
    if len(inserts) + len(deletes) != len(data) or (len(inserts) <= 1 and len(deletes) <= 1):
        return steps  # nothing to merge (consecutive steps of one kind are merged already)
    first_delete: dict[tuple[Column, ...], dict[tuple, int]] = {}  # key columns -> key -> first delete position
    for pos, step in enumerate(data):
        if isinstance(step, DeleteRows):
            for conds in step.conditions:
                if any(typ not in _EXACT_EQUALITY_TYPES for _, typ, _ in conds):
                    return steps
                key_columns = tuple((name, typ) for name, typ, _ in conds)
                first_delete.setdefault(key_columns, {}).setdefault(tuple(value for _, _, value in conds), pos)
    positioned = [(pos, step) for pos, step in enumerate(data) if isinstance(step, InsertRows)]
    for key_columns, keys in first_delete.items():
        if _matches_a_later_insert(positioned, key_columns, keys):
            return steps  # a delete matches a row inserted after it: it stays a barrier
    parts = [part for step in inserts for part in step.parts]
    sources = [source for step in inserts for source in step.sources]
    merged: list[Step] = [InsertRows(columns=merge_columns(inserts), parts=parts, sources=sources)]
    merged.append(DeleteRows(conditions=[conds for step in deletes for conds in step.conditions]))
    return steps[:head] + merged
