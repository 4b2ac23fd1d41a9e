"""The DuckDB writer: one apply's statements, inside the transaction the warehouse opened.

Exactly once: the call's dedup_ids are recorded in `_ingest_applied` (a plain INSERT; if
the primary key refuses one, the transaction is retried with `INSERT OR IGNORE ...
RETURNING`: an index probe per id either way, so its cost does not grow with the
table) and those already there are skipped.

Inserts arrive as the planner's Arrow table (`InsertRows.table`, each column in its
type's `arrow_type`), which DuckDB scans in place: one `INSERT ... SELECT` per run of
inserts, converting in SQL only WKT to GEOMETRY and JSON text to JSON; values never
become Python objects or SQL text. A run of deletes is one semi-join per set of named
columns against an Arrow batch of its keys (`DELETE ... WHERE EXISTS`). A run of upserts
is, on the last row of each key (deduplicated in Arrow), one such semi-join on the
key columns plus one `INSERT ... SELECT`: the whole row is replaced, never row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Mapping, Sequence

import duckdb
import pyarrow as pa

from app.schema.columnar import to_arrow
from app.warehouse.base import ApplyResult, Envelope
from app.warehouse.duckdb.catalog import APPLIED_TABLE, COLUMNS_TABLE, KEYS_TABLE, STAGE_TABLE, STAGE_VIEW, quote_ident
from app.warehouse.duckdb.options import set_description
from app.warehouse.duckdb.types import TYPE_MAPPER, DuckType, key_param
from app.warehouse.duckdb.widening import DUCKDB_WIDENINGS, widen_sql
from app.warehouse.plan import (
    AddColumns,
    Column,
    CreateTable,
    DeleteRows,
    InsertRows,
    Plan,
    Schema,
    Step,
    UpsertRows,
    WidenColumns,
    coalesce_steps,
    plan_table,
)


class SpatialNeeded(Exception):
    """An apply names a geography column but the connection has not loaded spatial (yet)."""


class SeenBefore(Exception):
    """Some dedup_id of the apply is recorded already: claim again, skipping those."""


def names_geography(steps: Sequence[Step]) -> bool:
    for step in steps:
        if isinstance(step, DeleteRows):
            if any(typ == "geography" for conds in step.conditions for _, typ, _ in conds):
                return True
        elif isinstance(step, WidenColumns):
            continue  # only numbers widen
        elif any(typ == "geography" for _, typ in step.columns):
            return True
    return False


def first_of_new(envelopes: Sequence[Envelope], new_ids: set[str], result: ApplyResult) -> list[Envelope]:
    """The envelopes whose dedup_id was just claimed, each id once (taken out of `new_ids`);
    the others count as skipped duplicates."""
    todo: list[Envelope] = []
    for env in envelopes:
        if env.dedup_id in new_ids:
            new_ids.discard(env.dedup_id)  # the same id twice in one call applies once
            todo.append(env)
        else:
            result.skipped_duplicates += 1
    return todo


@dataclass
class TablePlan:
    """One table's plan and the statements to run (deletes and inserts coalesced)."""

    plan: Plan
    steps: list[Step]
    envelopes: int


class Writer:
    """The statements of one apply on `con`; `types`: how each activity type is stored."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        types: dict[str, DuckType],
        new_table_options: Callable[[str], Mapping[str, Any]] | None = None,
        upserts: bool = True,
    ) -> None:
        self.con = con
        self.types = types
        self.new_table_options = new_table_options  # table -> the options a table created now gets
        self.upserts = upserts  # the capability: apply upserts (else the planner rejects them)
        self._columns: list[tuple[str, str, str]] = []  # (table, column, activity type) to record
        self._created: list[str] = []  # tables created by this apply (lower case)
        self._stage_tables: list[str] = []  # temporary tables `stage` filled (dropped by `finish`)
        self._staged: dict[int, tuple[str, int, int]] = {}  # id(InsertRows) -> (stage table, its width, step number)

    def finish(self) -> None:
        """Before COMMIT: record the activity types of the columns created, in one statement.

        A created table's columns are recorded only where the stored type does not tell
        the activity type back (`needs_record`); rows a table dropped outside the pipeline
        left behind are deleted first (a no-op delete costs nothing, while every row
        written to this indexed table kept ~300 KB resident per apply in DuckDB 1.5).
        """
        for name in self._stage_tables:
            self.con.execute(f"DROP TABLE {name}")
        self._stage_tables = []
        if self._created:
            self.con.execute(
                f"DELETE FROM {COLUMNS_TABLE} WHERE table_name IN (SELECT unnest(?::VARCHAR[]))", [self._created]
            )
            self._created = []
        if self._columns:
            names = ("table_name", "column_name", "activity_type")
            self.con.register(STAGE_VIEW, pa.Table.from_arrays(
                [pa.array(list(values), pa.string()) for values in zip(*self._columns)], names=list(names)
            ))
            self.con.execute(f"INSERT OR REPLACE INTO {COLUMNS_TABLE} SELECT * FROM {STAGE_VIEW}")
            self.con.unregister(STAGE_VIEW)
            self._columns = []

    def _record_key(self, table: str, key: tuple[str, ...]) -> None:
        """The key a table's first upsert fixed (a table is keyed once: never replaced)."""
        self.con.execute(f"INSERT INTO {KEYS_TABLE} VALUES (?, ?)", [table, list(key)])

    def claim(self, envelopes: Sequence[Envelope], all_new: bool) -> set[str]:
        """Record the envelopes' dedup_ids (of any tables) in one statement; those new."""
        return self._claim_ids(list(dict.fromkeys(env.dedup_id for env in envelopes)), all_new)

    def plan_table(
        self,
        table: str,
        todo: list[Envelope],
        schema: Schema | None,
        result: ApplyResult,
        spatial_missing: bool,
    ) -> TablePlan | None:
        """The statements for one table's envelopes (None: nothing to do), claimed
        already (`claim`); `execute` runs them inside the open transaction, after `stage`
        has copied the inserts of tables alike into temporary tables.

        `schema`: the table's (None: it does not exist; the caller read the catalog).
        `spatial_missing`: raise `SpatialNeeded` if the plan names a geography column.
        """
        if not todo:
            return None
        plan = plan_table(table, schema, todo, DUCKDB_WIDENINGS, upserts=self.upserts)
        if spatial_missing and names_geography(plan.steps):
            raise SpatialNeeded()
        return TablePlan(plan, coalesce_steps(plan.steps), len(todo))

    def stage(self, plans: Sequence[TablePlan]) -> None:
        """Copy the inserts of several tables that share columns (names and types) into one
        temporary table each, from one Arrow scan: DuckDB's scan of a registered Arrow table
        costs ~1 ms a statement however small, an insert from a native table ~0.3 ms."""
        alike: dict[tuple[Column, ...], list[InsertRows]] = {}
        for planned in plans:
            for step in planned.steps:
                if isinstance(step, InsertRows):
                    alike.setdefault(tuple(step.columns), []).append(step)
        for steps in alike.values():
            if len(steps) < 2:
                continue
            name = f"{STAGE_TABLE}{len(self._stage_tables)}"
            tables = [step.table.combine_chunks() for step in steps]
            which = pa.array([i for i, t in enumerate(tables) for _ in range(t.num_rows)], pa.int32())
            rows = pa.concat_tables(tables)
            self._stage([*rows.columns, which])
            self.con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {STAGE_VIEW}")
            self.con.unregister(STAGE_VIEW)
            self._stage_tables.append(name)
            for i, step in enumerate(steps):
                self._staged[id(step)] = (name, len(step.columns), i)

    def execute(self, table: str, planned: TablePlan, result: ApplyResult) -> Schema | None:
        """Run one table's planned statements; returns its schema after them."""
        plan = planned.plan
        result.rejections.extend(plan.rejections)
        result.noop_deletes += plan.noop_deletes
        result.schema_changes += plan.schema_changes
        result.columns_widened += plan.columns_widened
        qtable = quote_ident(table)
        lower_table = table.lower()
        for step in planned.steps:
            if isinstance(step, InsertRows):
                result.rows_inserted += self._insert(qtable, step)
            elif isinstance(step, DeleteRows):
                result.rows_deleted += self._delete(qtable, step)
            elif isinstance(step, UpsertRows):
                result.rows_upserted += self._upsert(qtable, step)
            elif isinstance(step, CreateTable):
                cols = ", ".join(f"{quote_ident(n)} {self.types[t].sql_type}" for n, t in step.columns)
                if step.key:
                    cols += f", PRIMARY KEY ({', '.join(quote_ident(n) for n in step.key)})"
                self.con.execute(f"CREATE TABLE {qtable} ({cols})")
                self._created.append(lower_table)
                self._record_columns(lower_table, [(n, t) for n, t in step.columns if self.needs_record(t)])
                # --- table options (tables file), in the same transaction as the CREATE
                description = self.new_table_options(table).get("description") if self.new_table_options else None
                if description is not None:
                    set_description(self.con, table, description)
            elif isinstance(step, AddColumns):
                for n, t in step.columns:
                    self.con.execute(f"ALTER TABLE {qtable} ADD COLUMN {quote_ident(n)} {self.types[t].sql_type}")
                self._record_columns(lower_table, step.columns)
            elif isinstance(step, WidenColumns):  # --- type widening (app.schema.widening)
                for n, old, new in step.columns:
                    self.con.execute(widen_sql(table, n, old, new, self.types))
                self._record_columns(lower_table, [(n, new) for n, _, new in step.columns])
        if plan.new_key is not None:
            self._record_key(lower_table, plan.new_key)
        result.applied_envelopes += planned.envelopes
        return plan.schema

    def _claim_ids(self, ids: list[str], all_new: bool) -> set[str]:
        """Record ids in `_ingest_applied` (same transaction); return those not recorded before.

        With `all_new` (the common case: no redelivery), a plain INSERT, ~5x cheaper than
        `INSERT OR IGNORE ... RETURNING` for hundreds of ids in DuckDB 1.5; if an id is
        there already the primary key refuses it and `SeenBefore` asks for a retry
        without `all_new`. Either way each id is checked through the primary-key index, so
        the cost does not grow with the table (an `IN (...)` lookup scans it).
        """
        con = self.con
        if all_new:
            try:
                con.register(STAGE_VIEW, pa.table({"c0": pa.array(ids, type=pa.string())}))
                con.execute(f"INSERT INTO {APPLIED_TABLE} SELECT c0, now() FROM {STAGE_VIEW}")
            except duckdb.ConstraintException as exc:
                raise SeenBefore() from exc
            finally:
                con.unregister(STAGE_VIEW)
            return set(ids)
        if len(ids) <= 16:  # small: bound parameters (binding big lists is slow in duckdb-python)
            sql = (
                f"INSERT OR IGNORE INTO {APPLIED_TABLE} VALUES "
                + ", ".join(["(?, now())"] * len(ids))
                + " RETURNING dedup_id"
            )
            rows = con.execute(sql, ids).fetchall()
        else:
            con.register(STAGE_VIEW, pa.table({"c0": pa.array(ids, type=pa.string())}))
            rows = con.execute(
                f"INSERT OR IGNORE INTO {APPLIED_TABLE} SELECT c0, now() FROM {STAGE_VIEW} RETURNING dedup_id"
            ).fetchall()
            con.unregister(STAGE_VIEW)
        return {row[0] for row in rows}

    def needs_record(self, activity_type: str) -> bool:
        """Whether a column of this type must be recorded in `_ingest_columns` (its stored
        type reads back as another activity type, e.g. bignumeric as VARCHAR)."""
        return TYPE_MAPPER.activity_type_of(self.types[activity_type].sql_type) != activity_type

    def _record_columns(self, table: str, columns: list[tuple[str, str]]) -> None:
        # recorded by `finish`, all tables' at once (one INSERT OR REPLACE costs ~2 ms)
        self._columns.extend((table, n, t) for n, t in columns)

    def _stage(self, columns: Sequence[pa.Array | pa.ChunkedArray]) -> None:
        """Register Arrow columns as STAGE_VIEW, named c0, c1, ... (DuckDB scans them in place)."""
        self.con.register(STAGE_VIEW, pa.Table.from_arrays(list(columns), names=[f"c{i}" for i in range(len(columns))]))

    def _insert(self, qtable: str, step: InsertRows) -> int:
        targets = ", ".join(quote_ident(name) for name, _ in step.columns)
        staged = self._staged.pop(id(step), None)
        if staged is not None:
            name, width, which = staged
            exprs = ", ".join(self.types[typ].value_sql.format(f"c{i}") for i, (_, typ) in enumerate(step.columns))
            self.con.execute(f"INSERT INTO {qtable} ({targets}) SELECT {exprs} FROM {name} WHERE c{width} = {which}")
            return step.count
        # One chunk per column: DuckDB scans each Arrow chunk on its own, and a run of
        # 500-row chunks (one per message) inserts half as fast; combining costs ~0.01 ms per 1k rows.
        self._stage(step.table.combine_chunks().columns)
        exprs = ", ".join(self.types[typ].value_sql.format(f"c{i}") for i, (_, typ) in enumerate(step.columns))
        self.con.execute(f"INSERT INTO {qtable} ({targets}) SELECT {exprs} FROM {STAGE_VIEW}")
        self.con.unregister(STAGE_VIEW)
        return step.count

    def _upsert(self, qtable: str, step: UpsertRows) -> int:
        """Each key's last row replaces the rows with that key: one semi-join delete of the
        keys, one append, on one staged Arrow table (key values are never NULL)."""
        rows = step.last_per_key().combine_chunks()
        self._stage(rows.columns)
        position = {name: i for i, (name, _) in enumerate(step.columns)}
        match = " AND ".join(
            f"{qtable}.{quote_ident(name)} = {self.types[typ].value_sql.format(f'k.c{position[name]}')}"
            for name, typ in step.key
        )
        self.con.execute(f"DELETE FROM {qtable} WHERE EXISTS (SELECT 1 FROM {STAGE_VIEW} k WHERE {match})")
        targets = ", ".join(quote_ident(name) for name, _ in step.columns)
        exprs = ", ".join(self.types[typ].value_sql.format(f"c{i}") for i, (_, typ) in enumerate(step.columns))
        self.con.execute(f"INSERT INTO {qtable} ({targets}) SELECT {exprs} FROM {STAGE_VIEW}")
        self.con.unregister(STAGE_VIEW)
        return step.count

    def _delete(self, qtable: str, step: DeleteRows) -> int:
        """A run of deletes: one semi-join per set of named columns, against an Arrow batch of keys.

        Deletes commute with each other, so their order inside the run does not matter; a
        NULL key matches NULL (`IS NOT DISTINCT FROM`, which DuckDB runs as a hash join).
        Each statement's count excludes rows an earlier statement already deleted.
        """
        groups: dict[tuple[tuple[str, str], ...], list[tuple[Any, ...]]] = {}
        for conds in step.conditions:
            ordered = sorted(conds, key=itemgetter(0))  # (a, b) and (b, a) are one column set
            key = tuple((name, typ) for name, typ, _ in ordered)
            groups.setdefault(key, []).append(tuple(value for _, _, value in ordered))
        return sum(self._delete_keys(qtable, columns, keys) for columns, keys in groups.items())

    def _delete_keys(self, qtable: str, columns: tuple[tuple[str, str], ...], keys: list[tuple[Any, ...]]) -> int:
        def match(key_sql: Callable[[int], str]) -> str:
            return " AND ".join(
                f"{self.types[typ].compare_column_sql.format(qtable + '.' + quote_ident(name))} "
                f"IS NOT DISTINCT FROM {self.types[typ].cmp_value(key_sql(i))}"
                for i, (name, typ) in enumerate(columns)
            )

        if len(keys) == 1:
            # One key: bound parameters filter the scan directly, ~3x faster than registering
            # a one-row Arrow table and joining it (a lone delete between inserts is common).
            params = [key_param(typ, value) for (_, typ), value in zip(columns, keys[0])]
            return self.con.execute(f"DELETE FROM {qtable} WHERE {match(lambda i: '?')}", params).fetchone()[0]
        self._stage([to_arrow(typ, list(values)) for (_, typ), values in zip(columns, zip(*keys))])
        count = self.con.execute(
            f"DELETE FROM {qtable} WHERE EXISTS (SELECT 1 FROM {STAGE_VIEW} k WHERE {match(lambda i: f'k.c{i}')})"
        ).fetchone()[0]
        self.con.unregister(STAGE_VIEW)
        return count
