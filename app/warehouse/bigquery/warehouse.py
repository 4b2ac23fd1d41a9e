"""BigQueryWarehouse: orchestrates one `apply(table, envelopes)`.

All of it runs under a per-table lock (one process never writes a table from two
threads at once; different tables apply concurrently):

1. **Dedup lookup** on the markers table for the envelopes' dedup_ids (skipped when this
   process already saw them all complete): completed ones are skipped, a dedup_id
   repeated inside the batch is applied once.
2. **Plan** with the shared planner: inserts merged, deletes as barriers, type
   conflicts and unknown delete columns become `Rejection`s. Every value is converted
   (Arrow batches / JSON rows / query parameters) before anything is written; a row too
   big for any AppendRows request is rejected alone.
3. **Schema**: a missing table is created, new columns are added with one
   etag-conditional patch; when another writer changed the table first, re-read and
   re-plan (see `schema.py`).
4. **Exactly once** (see `README.md`, Delivery guarantees): rows left by an earlier
   attempt that wrote an intent but no completion are deleted, an `intent` marker is
   written for the new dedup_ids, then the data (Storage Write appends, DML deletes),
   then `done` markers.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import re
import threading
import uuid
from typing import Any, Iterable, Sequence

import pyarrow as pa
from google.cloud import bigquery

from app.schema.activity import Activity
from app.schema.identifiers import check_applied_table_name, check_column_name, check_table_name
from app.settings import Settings
from app.warehouse import plan as planner
from app.warehouse.base import (
    ApplyResult,
    Capabilities,
    Envelope,
    QueryResult,
    Rejection,
    TerminalWarehouseError,
    TransientWarehouseError,
    Warehouse,
    WarehouseQueryError,
    WarehouseUnavailable,
)
from app.warehouse.bigquery import errors
from app.warehouse.bigquery.client import BigQueryClient
from app.warehouse.bigquery.queries import DONE, INTENT, Queries, dml_job_id, table_job_prefix
from app.warehouse.bigquery.schema import (
    DATASET_RE,
    DEDUP_COLUMN,
    MARKERS_TABLE,
    SchemaRaced,
    TableRef,
    TableSchemas,
    TableState,
)
from app.warehouse.bigquery.types import TypeMapper, TypeOverrides, positional_param
from app.warehouse.bigquery.writer import (
    MAX_INSERT_ALL_BYTES,
    InsertAllWriter,
    StorageWriter,
    insert_id,
    split_rows,
)

import orjson

log = logging.getLogger(__name__)

_PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$|^[A-Za-z0-9:._-]+$")
SCHEMA_RETRIES = 6
_COUNTS_PER_QUERY = 50
REFUSED_ROWS_RETRIES = 4  # re-runs leaving out rows AppendRows refused
DONE_CACHE_SIZE = 100_000
# Rows of an attempt land in partitions from its intent's day on; allow for a writer's
# clock running ahead of BigQuery's.
CLOCK_SKEW_MARGIN = dt.timedelta(hours=1)
_MARKER_SCHEMA = pa.schema(
    [
        ("dedup_id", pa.string()),
        ("table_name", pa.string()),
        ("state", pa.string()),
        ("marked_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Process-wide per-table locks: two warehouse instances in one process (tests, a
# subscriber with several worker threads) never write one table at the same time.
_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _table_lock(key: tuple[str, str, str]) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


class BigQueryWarehouse(Warehouse):
    def __init__(self, settings: Settings, *, client: Any = None, type_overrides: TypeOverrides | None = None) -> None:
        """`type_overrides`: activity types kept in another column type than Google's (tests only)."""
        self.settings = settings
        self.project = settings.gcp_project
        self.dataset = settings.bigquery_dataset
        if not DATASET_RE.match(self.dataset) or not _PROJECT_RE.match(self.project):
            raise ValueError(f"invalid BigQuery project/dataset {self.project!r}/{self.dataset!r}")
        self.insert_mode = settings.bigquery_insert_mode
        self.capabilities = Capabilities(
            transactional=False,
            max_alters_per_statement=None,
            supports_geometry=True,
            concurrent_tables=True,  # per-table locks; shared caches and counters are locked
            max_columns=10_000,  # https://cloud.google.com/bigquery/quotas#standard_tables
        )
        self.client = BigQueryClient(settings, rest=client)
        self.api_calls = self.client.calls  # calls per kind (see client.py)
        self.bytes_processed = self.client.bytes_processed  # job bytes per kind
        self.types = self.type_mapper = TypeMapper(type_overrides)
        self.schemas = TableSchemas(settings, self.client, self.types)
        self.queries = Queries(self.client, self.types)
        # the writer's own local-stand-in branch goes with its rework (writer.py, issue 16 part B)
        self.writer = StorageWriter(self.client, emulator=bool(settings.bigquery_emulator_host))
        self.insert_all = InsertAllWriter(self.client)
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._done_lock = threading.Lock()

    def _ref(self, table: str) -> TableRef:
        error = check_applied_table_name(table)  # the quarantine table too
        if error is not None:
            raise TerminalWarehouseError(f"invalid BigQuery table: {error}")
        return TableRef(self.project, self.dataset, table)

    # ----------------------------------------------------------------- apply

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        result = ApplyResult()
        if not envelopes:
            return result
        try:
            ref = self._ref(table)
        except TerminalWarehouseError as exc:
            for env in envelopes:
                for i, act in enumerate(env.activities):
                    result.rejections.append(Rejection(env.dedup_id, i, act, str(exc)))
                result.applied_envelopes += 1
            return result
        with _table_lock((ref.project, ref.dataset, ref.table)):
            try:
                refused: dict[tuple[str, int], str] = {}
                for _ in range(REFUSED_ROWS_RETRIES):
                    try:
                        return self._apply_locked(ref, list(envelopes), ApplyResult(), refused)
                    except _RowsRefused as rows:
                        # nothing of the refusing request was written; the re-run cleans up what
                        # the attempt wrote (its intents have no completion) and leaves those out
                        refused.update(rows.reasons)
                raise TerminalWarehouseError(f"BigQuery kept refusing rows of {table}: {sorted(refused.values())[:5]}")
            except Exception as exc:
                if errors.is_not_found(exc):
                    # The dataset, a table or the markers table vanished under the cache
                    # (dropped by hand, a fresh test dataset): forget what we knew and retry;
                    # the next attempt creates what is missing.
                    self.schemas.forget()
                    raise TransientWarehouseError(
                        f"BigQuery {table}: something cached is gone, retrying: {exc}"
                    ) from exc
                raise

    def _apply_locked(
        self, ref: TableRef, envelopes: list[Envelope], result: ApplyResult, refused: dict[tuple[str, int], str]
    ) -> ApplyResult:
        table = ref.table
        unique: dict[str, Envelope] = {}
        for env in envelopes:
            if env.dedup_id in unique:
                result.skipped_duplicates += 1
            else:
                unique[env.dedup_id] = env
        with self._done_lock:
            unknown = [i for i in unique if i not in self._done]
        if not unknown:
            result.skipped_duplicates += len(unique)
            return result
        markers = self.schemas.ensure_markers()
        lookup = self.queries.lookup_markers(markers, table, unknown)
        self._remember_done(lookup.done)
        todo = [e for i, e in unique.items() if i in unknown and i not in lookup.done]
        result.skipped_duplicates += len(unique) - len(todo)
        if not todo:
            return result

        plan, state, created, writes, oversized = self._plan_and_prepare_schema(ref, todo, refused)

        ids = [e.dedup_id for e in todo]
        attempt = uuid.uuid4().hex[:12]  # this try's DML jobs: ids unique to it, deterministic within it
        unfinished = {i: at for i, at in lookup.unfinished.items() if i in unique}
        if unfinished and state is not None and not created:  # a table created just now holds no leftovers
            # an earlier attempt's DML job may still run: it ends before anything is cleaned or rewritten
            self.client.settle_jobs(table_job_prefix(ref), f"earlier attempts in {table}")
            self._clean_unfinished(ref, state, unfinished, attempt)
        self._write_markers(markers, table, [i for i in ids if i not in lookup.intents], INTENT)
        self._write_data(ref, writes, result, ids, attempt)
        self._write_markers(markers, table, ids, DONE)
        self._remember_done(ids)
        result.applied_envelopes += len(todo)
        result.noop_deletes += plan.noop_deletes
        result.schema_changes += plan.schema_changes
        result.rejections.extend(plan.rejections)
        result.rejections.extend(oversized)
        return result

    def _clean_unfinished(
        self, ref: TableRef, state: TableState, unfinished: dict[str, dt.datetime], attempt: str
    ) -> None:
        """Remove rows of earlier attempts that wrote an intent but never completed."""
        since = min(unfinished.values()) - CLOCK_SKEW_MARGIN
        n = self.queries.clean(
            ref, list(unfinished), since, partitioned=state.partitioned_by_ingestion, attempt=attempt
        )
        if n:
            log.warning("removed %d rows left by unfinished attempts of %s in %s", n, list(unfinished), ref.table)

    def _write_data(
        self, ref: TableRef, writes: list[tuple[str, Any, int]], result: ApplyResult, ids: list[str], attempt: str
    ) -> None:
        """The prepared inserts and deletes, in plan order."""
        for step, (kind, payload, count) in enumerate(writes):
            if kind == "insert":
                requests, sent = payload
                try:
                    self.writer.append(ref.default_stream, ref.table, requests)
                except errors.RowsRefusedError as exc:
                    sources = sent.sources()
                    reasons = {sources[row]: f"BigQuery refused the row: {why}" for row, why in exc.row_errors.items()}
                    raise _RowsRefused(reasons) from exc
                result.rows_inserted += count
            elif kind == "insert_all":
                self.insert_all.insert(ref.api, ref.table, payload)
                result.rows_inserted += count
            else:
                for n, (sql, params) in enumerate(payload):
                    job_id = dml_job_id(ref, ids, f"delete{step}-{n}", attempt)
                    result.rows_deleted += self.queries.dml(sql, params, job_id, f"delete from {ref.table}")

    def _plan_and_prepare_schema(
        self, ref: TableRef, todo: list[Envelope], refused: dict[tuple[str, int], str]
    ) -> tuple[planner.Plan, TableState | None, bool, list[tuple[str, Any, int]], list[Rejection]]:
        """Plan, convert every value, and bring the table's schema up to the plan.

        Re-planned when another writer changed the table under us.
        """
        state = self.schemas.state(ref.table)
        for _ in range(SCHEMA_RETRIES):
            plan = self._plan(ref.table, state, todo, refused)
            new_columns: list[planner.Column] = []
            create = False
            for step in plan.steps:
                if isinstance(step, planner.CreateTable):
                    create = True
                    new_columns.extend(step.columns)
                elif isinstance(step, planner.AddColumns):
                    new_columns.extend(step.columns)
            try:
                writes, oversized = self._prepare(ref, plan, todo)
            except (ValueError, TypeError, ArithmeticError, OverflowError) as exc:
                raise TerminalWarehouseError(f"value BigQuery cannot take in {ref.table}: {exc}") from exc
            try:
                if create:
                    state = self.schemas.create(ref, new_columns)
                elif state is not None and (new_columns or not state.has_dedup_column):
                    state = self.schemas.add_columns(ref, state, new_columns)
                return plan, state, create, writes, oversized  # state None: only deletes on a missing table
            except SchemaRaced as raced:
                log.info("schema of %s changed concurrently (%s); re-reading", ref.table, raced)
                state = self.schemas.fetch(ref.table)
        raise TransientWarehouseError(f"schema of {ref.table} kept changing under us")

    def _plan(
        self, table: str, state: TableState | None, envelopes: list[Envelope], refused: dict[tuple[str, int], str]
    ) -> planner.Plan:
        """The shared planner, plus BigQuery's own column-name rules and rows BigQuery
        refused in an earlier attempt (`refused`) as rejections."""
        swapped: dict[tuple[str, int], tuple[Activity, str]] = {}
        planned: list[Envelope] = []
        refused_ids = {dedup_id for dedup_id, _ in refused}
        for env in envelopes:
            runs = env.runs
            if runs is not None and env.dedup_id not in refused_ids and not any(_bad_columns(r.col_names) for r in runs):
                planned.append(env)  # columnar: planned without a Python object per value
                continue
            acts = env.activities
            new_acts = None
            for i, act in enumerate(acts):
                reason = refused.get((env.dedup_id, i)) or _bad_columns(act.col_names)
                if reason is not None:
                    if new_acts is None:
                        new_acts = list(acts)
                    # the planner rejects an unknown operation; the reason is replaced below
                    new_acts[i] = Activity("__rejected__", act.table, [], [], [])  # type: ignore[arg-type]
                    swapped[(env.dedup_id, i)] = (act, reason)
            planned.append(
                env if new_acts is None else Envelope(env.dedup_id, env.table, new_acts, env.delivery_attempt)
            )
        schema = dict(state.schema) if state is not None else None
        plan = planner.plan_table(table, schema, planned)
        # A few deletes among many inserts: one write and one DML instead of one each per delete.
        plan.steps = planner.coalesce_steps(plan.steps)
        if swapped:
            plan.rejections = [
                Rejection(r.dedup_id, r.index, *swapped[(r.dedup_id, r.index)])
                if (r.dedup_id, r.index) in swapped
                else r
                for r in plan.rejections
            ]
        return plan

    def _prepare(
        self, ref: TableRef, plan: planner.Plan, todo: list[Envelope]
    ) -> tuple[list[tuple[str, Any, int]], list[Rejection]]:
        """The plan's data steps as ready-to-send payloads (no I/O), and rows too big to send."""
        by_id = {env.dedup_id: env for env in todo}
        writes: list[tuple[str, Any, int]] = []
        oversized: list[Rejection] = []
        for step in plan.steps:
            if isinstance(step, planner.InsertRows):
                if self.insert_mode == "insert_all":
                    chunks, too_big = self._json_rows(step)
                    writes.append(("insert_all", chunks, step.count - len(too_big)))
                else:
                    requests, too_big = split_rows(self._arrow_batch(step))
                    writes.append(("insert", (requests, _SentRows(step, [row for row, _ in too_big])), step.count - len(too_big)))
                if too_big:
                    sources = step.source_rows()
                    for row, size in too_big:
                        dedup_id, index = sources[row]
                        activity = by_id[dedup_id].activities[index]  # materialized only here
                        oversized.append(
                            Rejection(dedup_id, index, activity, f"row of {size} bytes exceeds BigQuery's request size limit")
                        )
            elif isinstance(step, planner.DeleteRows):
                writes.append(("delete", self.queries.delete_statements(ref, step), len(step.conditions)))
        return writes, oversized

    def _arrow_batch(self, step: planner.InsertRows) -> pa.RecordBatch:
        """The planner's Arrow rows as BigQuery takes them, plus each row's dedup_id."""
        fields = [pa.field(name, self.types.arrow_type(typ)) for name, typ in step.columns]
        arrays = [self.types.arrow_column(typ, step.table.column(name)) for name, typ in step.columns]
        fields.append(pa.field(DEDUP_COLUMN, pa.string()))
        arrays.append(step.dedup_ids())
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields)).combine_chunks()
        batches = table.to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)

    def _json_rows(self, step: planner.InsertRows) -> tuple[list, list[tuple[int, int]]]:
        """insertAll rows: this legacy path builds Python values."""
        values = step.canonical_values()
        columns = [(name, typ, values[name]) for name, typ in step.columns]
        rows: list[dict] = []
        row_ids: list[str] = []
        sizes: list[int] = []
        too_big: list[tuple[int, int]] = []
        for r, (dedup_id, index) in enumerate(step.source_rows()):
            row = {name: self.types.json_value(typ, vals[r]) for name, typ, vals in columns if vals[r] is not None}
            row[DEDUP_COLUMN] = dedup_id
            size = len(orjson.dumps(row)) + 200  # + insertId and JSON framing
            if size > MAX_INSERT_ALL_BYTES:
                too_big.append((r, size))
                continue
            rows.append(row)
            row_ids.append(insert_id(dedup_id, index))
            sizes.append(size)
        return self.insert_all.chunks(rows, row_ids, sizes), too_big

    # ----------------------------------------------------------------- markers

    def _write_markers(self, markers: TableRef, table: str, ids: list[str], state: str) -> None:
        if not ids:
            return
        now = dt.datetime.now(dt.timezone.utc)
        if self.insert_mode == "insert_all":
            rows = [{"dedup_id": i, "table_name": table, "state": state, "marked_at": now.isoformat()} for i in ids]
            row_ids = [insert_id(f"{table}\x00{i}", 0 if state == INTENT else 1) for i in ids]
            self.insert_all.insert(
                markers.api, MARKERS_TABLE, self.insert_all.chunks(rows, row_ids, [len(i) + 200 for i in ids])
            )
            return
        n = len(ids)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array([table] * n, pa.string()),
                pa.array([state] * n, pa.string()),
                pa.array([now] * n, _MARKER_SCHEMA.field("marked_at").type),
            ],
            schema=_MARKER_SCHEMA,
        )
        requests, _ = split_rows(batch)
        self.writer.append(markers.default_stream, MARKERS_TABLE, requests)

    def _remember_done(self, ids: Iterable[str]) -> None:
        with self._done_lock:
            for i in ids:
                self._done[i] = None
                self._done.move_to_end(i)
            while len(self._done) > DONE_CACHE_SIZE:
                self._done.popitem(last=False)

    # ----------------------------------------------------------------- reads

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        qparams = [positional_param(v) for v in (params or [])]
        try:
            # read-only: a dry run says what the statement is before anything runs
            statement = self.client.statement_type(sql, qparams, "query (dry run)")
            if statement != "SELECT":
                raise WarehouseQueryError(f"only a read (SELECT) may run here, not {statement or 'this statement'}")
            rows = self.client.query(sql, qparams, "query", "query")
        except TerminalWarehouseError as exc:
            raise WarehouseQueryError(str(exc)) from exc
        columns = [f.name for f in rows.schema]
        return QueryResult(columns, [tuple(r.values()) for r in rows], [self.types.result_type(f) for f in rows.schema])

    def list_tables(self) -> list[str]:
        listed = self.client.list_tables()
        return sorted(name for name in listed if check_table_name(name) is None)

    def count_rows(self, tables: Sequence[str]) -> dict[str, int]:
        existing = set(self.list_tables())  # BigQuery table names are case-sensitive
        wanted = [name for name in dict.fromkeys(tables) if name in existing]
        counts: dict[str, int] = {}
        for start in range(0, len(wanted), _COUNTS_PER_QUERY):
            chunk = wanted[start : start + _COUNTS_PER_QUERY]
            sql = " UNION ALL ".join(
                f"SELECT @t{i} AS t, COUNT(*) AS n FROM {self._ref(name).sql}" for i, name in enumerate(chunk)
            )
            params = [bigquery.ScalarQueryParameter(f"t{i}", "STRING", name) for i, name in enumerate(chunk)]
            rows = self.client.query(sql, params, "query", "count rows")
            counts.update({row["t"]: int(row["n"]) for row in rows})
        return counts

    def table_schema(self, table: str) -> dict[str, str] | None:
        if check_applied_table_name(table) is not None:
            return None
        state = self.schemas.fetch(table)
        if state is None:
            return None
        return {name: typ for name, typ in state.schema.values()}

    def ready(self) -> tuple[bool, str]:
        """Reachable and the dataset exists. A probe we may not run (403 without a
        quota reason) says nothing about health: reported ready, reason "unknown"."""
        try:
            dataset = self.client.get_dataset()
        except WarehouseUnavailable as exc:
            if exc.reason == "permission_denied":  # the role may lack datasets.get only
                return True, f"unknown: not allowed to read dataset {self.project}.{self.dataset} metadata"
            return False, f"BigQuery unavailable ({exc.reason}): {exc}"
        except TransientWarehouseError as exc:
            return False, f"BigQuery dataset {self.project}.{self.dataset} not reachable: {exc}"
        except TerminalWarehouseError as exc:
            if errors.is_permission_denied(exc):
                return True, f"unknown: not allowed to read dataset {self.project}.{self.dataset} metadata"
            return False, f"BigQuery dataset {self.project}.{self.dataset}: {exc}"
        if dataset is None:
            return False, f"BigQuery dataset {self.project}.{self.dataset} not found"
        return True, "ok"

    def close(self) -> None:
        self.writer.close()
        self.client.close()


class _SentRows:
    """The rows of an `InsertRows` sent to AppendRows (all but `left_out`), traced to their
    activities only when BigQuery refuses some (rare: no per-row objects otherwise)."""

    __slots__ = ("step", "left_out")

    def __init__(self, step: planner.InsertRows, left_out: list[int]) -> None:
        self.step = step
        self.left_out = set(left_out)

    def sources(self) -> list[tuple[str, int]]:
        """(dedup_id, index) of each row sent, in the order sent."""
        return [key for row, key in enumerate(self.step.source_rows()) if row not in self.left_out]


class _RowsRefused(Exception):
    """AppendRows refused these activities' rows: (dedup_id, index) -> reason."""

    def __init__(self, reasons: dict[tuple[str, int], str]) -> None:
        super().__init__(f"{len(reasons)} rows refused")
        self.reasons = reasons


def _bad_columns(col_names: Sequence[Any]) -> str | None:
    for name in col_names:
        error = check_column_name(name)
        if error is not None:
            return f"{error} (not valid in BigQuery)"
    return None
