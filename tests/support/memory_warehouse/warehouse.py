"""`MemoryWarehouse`: the `Warehouse` contract kept in memory.

Each apply plans with the shared planner (`app.warehouse.plan`), runs the steps with the
reference executor (`tests.support.reference`) on a copy of the table and commits the
copy with the call's dedup_ids in one assignment under a lock: exactly once per
dedup_id, and an apply that raises commits nothing. Deletes compare canonical values
(a geography matches the same WKT text, as on DuckDB without spatial).

Faults: `before_apply(table, envelopes)` runs first, outside the lock, so a test can
block one table's apply or raise `TransientWarehouseError` (retry) or any other error
(terminal). `observer` records calls, commits and overlapping applies.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from app.messages.envelope import Envelope
from app.schema.identifiers import check_applied_table_name
from app.settings import Settings
from app.warehouse.base import ApplyResult, Capabilities, QueryResult, Rejection, Warehouse
from app.warehouse.plan import plan_table
from app.warehouse.types import TypeMapper
from app.schema.types import TYPES
from tests.support.memory_warehouse.observer import ApplyObserver
from tests.support.memory_warehouse.queries import run_query
from tests.support.memory_warehouse.tables import StoredTable
from tests.support.reference import execute

BeforeApply = Callable[[str, list[Envelope]], None]


class MemoryWarehouse(Warehouse):
    def __init__(
        self,
        settings: Settings | None = None,  # the registry's `open(settings)`; nothing to configure
        *,
        concurrent_tables: bool = True,
        before_apply: BeforeApply | None = None,
    ) -> None:
        self.type_mapper = TypeMapper({typ: typ for typ in TYPES})  # kept as given: every type reads back
        self.capabilities = Capabilities(
            transactional=True, max_alters_per_statement=None, supports_geometry=False,
            concurrent_tables=concurrent_tables,
        )
        self.before_apply = before_apply
        self.observer = ApplyObserver()
        self._lock = threading.Lock()
        self._tables: dict[str, StoredTable] = {}
        self._applied_ids: set[str] = set()
        self._closed = False

    # -- apply ------------------------------------------------------------------------------

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        with self.observer.call(table):
            if self.before_apply is not None:
                self.before_apply(table, list(envelopes))
            with self._lock:
                return self._apply(table, envelopes)

    def _apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        result = ApplyResult()
        bad_table = check_applied_table_name(table)
        if bad_table is not None:
            for envelope in envelopes:
                result.rejections += [Rejection(envelope.dedup_id, i, a, bad_table) for i, a in enumerate(envelope.activities)]
            result.applied_envelopes = len(envelopes)  # nothing written, nothing recorded
            return result
        fresh: list[Envelope] = []
        seen = set(self._applied_ids)
        for envelope in envelopes:
            if envelope.dedup_id in seen:
                result.skipped_duplicates += 1
            else:
                seen.add(envelope.dedup_id)
                fresh.append(envelope)
        stored = self._tables.get(table)
        plan = plan_table(table, stored.schema if stored else None, fresh)
        before = list(stored.rows) if stored else []
        rows = execute(plan.steps, before)  # raises (commits nothing) on a value it cannot convert
        if plan.schema is not None:
            self._tables[table] = StoredTable(plan.schema, tuple(rows))
        self._applied_ids.update(e.dedup_id for e in fresh)
        self.observer.committed(table, fresh)
        result.applied_envelopes = len(fresh)
        result.rows_inserted = plan.rows_to_insert
        result.rows_deleted = len(before) + plan.rows_to_insert - len(rows)
        result.noop_deletes = plan.noop_deletes
        result.schema_changes = plan.schema_changes
        result.rejections = plan.rejections
        return result

    # -- reads ------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        with self._lock:
            tables = dict(self._tables)
        return run_query(tables, sql, params)

    def table_schema(self, table: str) -> dict[str, str] | None:
        with self._lock:
            stored = self._tables.get(table)
        return None if stored is None else stored.column_types()

    def list_tables(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)  # internal names are refused, never stored

    def count_rows(self, tables: Sequence[str]) -> dict[str, int]:
        with self._lock:
            return {t: len(self._tables[t].rows) for t in tables}

    def ready(self) -> tuple[bool, str]:
        return (False, "closed") if self._closed else (True, "ok")

    def close(self) -> None:
        self._closed = True

