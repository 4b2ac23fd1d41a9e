"""BigQueryWarehouse: orchestrates `apply_many` (several tables at once; `apply` is one).

All of it runs under the tables' locks (one process never writes a table from two
threads at once; other tables apply concurrently). Each step is shared by the tables of
one call, and a table that fails in a step gets its error while the others go on:

1. **Dedup lookup** on the markers table for the envelopes' dedup_ids, one query for all
   tables (skipped when this process already saw them all complete): completed ones are
   skipped, a dedup_id repeated inside the batch is applied once.
2. **Plan** with the shared planner: inserts merged, deletes as barriers, type
   conflicts and unknown delete columns become `Rejection`s. Every value is converted
   (Arrow batches / JSON rows / query parameters) before anything is written; a row too
   big for any AppendRows request is rejected alone.
3. **Schema**: a missing table is created, new columns are added with one
   etag-conditional patch; when another writer changed the table first, re-read and
   re-plan (see `schema.py`).
4. **Exactly once** (see `README.md`, Delivery guarantees): rows left by an earlier
   attempt that wrote an intent but no completion are deleted, `intent` markers are
   written for the new dedup_ids (one write), then the data (Storage Write appends, DML
   deletes, upsert MERGEs (`upsert.py`), each MERGE after an ownership check; tables in
   parallel over the writer's connection pool), then `done` markers (one write).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import re
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

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
    OptionsOutcome,
    applicable_options,
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
from app.warehouse.bigquery.options import apply_options, bigquery_table_options
from app.warehouse.bigquery.queries import (
    DONE,
    EVERY_PARTITION,
    INTENT,
    MarkerLookup,
    OwnerFence,
    Queries,
    dml_job_id,
    table_job_prefix,
)
from app.warehouse.bigquery.widening import bigquery_widenings
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
from app.warehouse.bigquery.upsert import upsert_statements
from app.warehouse.bigquery.type_lag import RecentWidenings
from app.warehouse.bigquery.writer import (
    ArrowRequest,
    MAX_INSERT_ALL_BYTES,
    InsertAllWriter,
    StagedStream,
    StorageWriter,
    insert_id,
    split_rows,
)

import orjson

log = logging.getLogger(__name__)

_PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$|^[A-Za-z0-9:._-]+$")
SCHEMA_RETRIES = 6
_COUNTS_PER_QUERY = 50
# Tables one `apply_many` takes: their writes share one lookup, one intent and one done write.
MAX_TABLES_PER_APPLY = 32
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
        ("attempt", pa.string()),
    ]
)

# Process-wide per-table locks: two warehouse instances in one process (tests, a
# subscriber with several worker threads) never write one table at the same time.
# Weakly held: a lock lives while someone holds or waits for it, not once per table ever seen.
_LOCKS: weakref.WeakValueDictionary[tuple[str, str, str], threading.Lock] = weakref.WeakValueDictionary()
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
            max_tables_per_apply=MAX_TABLES_PER_APPLY,
            max_columns=10_000,  # https://cloud.google.com/bigquery/quotas#standard_tables
            table_options=bigquery_table_options(settings.bigquery_partitioning == "day"),
            widenings=bigquery_widenings(TypeMapper(type_overrides)),
            upserts=True,  # one MERGE per run of upserts (upsert.py)
        )
        self.client = BigQueryClient(settings, rest=client)
        self.api_calls = self.client.calls  # calls per kind (see client.py)
        self.bytes_processed = self.client.bytes_processed  # job bytes per kind
        self.types = self.type_mapper = TypeMapper(type_overrides)
        self.schemas = TableSchemas(settings, self.client, self.types, self.options_for_new_table)
        self.queries = Queries(self.client, self.types)
        self.writer = StorageWriter(
            self.client, connections=settings.bigquery_write_connections, timeout=settings.bigquery_write_timeout_seconds
        )
        self._applier_pool: concurrent.futures.ThreadPoolExecutor | None = None  # tables' writes in parallel
        self._appliers_lock = threading.Lock()
        self.insert_all = InsertAllWriter(self.client)
        self.recent_widenings = RecentWidenings()
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._done_lock = threading.Lock()

    def _ref(self, table: str) -> TableRef:
        error = check_applied_table_name(table)  # the quarantine table too
        if error is not None:
            raise TerminalWarehouseError(f"invalid BigQuery table: {error}")
        return TableRef(self.project, self.dataset, table)

    # ----------------------------------------------------------------- apply

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        outcome = self.apply_many([(table, envelopes)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def apply_many(self, batches: Sequence[tuple[str, Sequence[Envelope]]]) -> list[ApplyResult | Exception]:
        """Several tables in one pass: one marker lookup, one intent write, the tables' data
        in parallel over the connection pool, one done write. A table that fails gets its
        exception in its slot (its intents without completion make a retry safe); the
        others complete. A table named twice is applied again after the others, in order."""
        outcomes: list[ApplyResult | Exception | None] = [None] * len(batches)
        jobs: list[_TableApply] = []
        again: list[int] = []
        for i, (table, envelopes) in enumerate(batches):
            if not envelopes:
                outcomes[i] = ApplyResult()
                continue
            try:
                ref = self._ref(table)
            except TerminalWarehouseError as exc:
                outcomes[i] = _all_rejected(envelopes, str(exc))
                continue
            if any(job.ref == ref for job in jobs):
                again.append(i)
            else:
                jobs.append(_TableApply(i, ref, list(envelopes)))
        if jobs:
            with contextlib.ExitStack() as held:  # in one order everywhere: no deadlock between callers
                for job in sorted(jobs, key=lambda j: j.ref.table):
                    held.enter_context(_table_lock((job.ref.project, job.ref.dataset, job.ref.table)))
                self._apply_jobs(jobs, outcomes)
        for i in again:
            outcomes[i] = self.apply_many([batches[i]])[0]
        return outcomes  # type: ignore[return-value]  # every slot is filled

    def _apply_jobs(self, jobs: list[_TableApply], outcomes: list[ApplyResult | Exception | None]) -> None:
        active = jobs
        for _ in range(REFUSED_ROWS_RETRIES):
            retry: list[_TableApply] = []
            for job, outcome in zip(active, self._apply_round(active)):
                if isinstance(outcome, _RowsRefused):
                    # nothing of the refusing request was written; the re-run cleans up what
                    # the attempt wrote (its intents have no completion) and leaves those out
                    job.refused.update(outcome.reasons)
                    retry.append(job)
                else:
                    outcomes[job.index] = self._settled(job.ref.table, outcome)
            active = retry
            if not active:
                return
        for job in active:
            outcomes[job.index] = TerminalWarehouseError(
                f"BigQuery kept refusing rows of {job.ref.table}: {sorted(job.refused.values())[:5]}"
            )

    def _settled(self, table: str, outcome: ApplyResult | Exception) -> ApplyResult | Exception:
        if isinstance(outcome, Exception) and errors.is_not_found(outcome):
            # The dataset, a table or the markers table vanished under the cache (dropped by
            # hand, a fresh test dataset): forget what we knew and retry; the next attempt
            # creates what is missing.
            self.schemas.forget()
            error = TransientWarehouseError(f"BigQuery {table}: something cached is gone, retrying: {outcome}")
            error.__cause__ = outcome
            return error
        return outcome

    def _apply_round(self, jobs: list[_TableApply]) -> list[ApplyResult | Exception]:
        """One attempt at every job; an outcome per job (`_RowsRefused`: re-run it)."""
        results = [ApplyResult() for _ in jobs]
        out: dict[int, ApplyResult | Exception] = {}
        unknown: dict[int, list[str]] = {}
        uniques: list[dict[str, Envelope]] = []
        for pos, job in enumerate(jobs):
            unique: dict[str, Envelope] = {}
            for env in job.envelopes:
                if env.dedup_id in unique:
                    results[pos].skipped_duplicates += 1
                else:
                    unique[env.dedup_id] = env
            uniques.append(unique)
            with self._done_lock:
                todo_ids = [i for i in unique if i not in self._done]
            if todo_ids:
                unknown[pos] = todo_ids
            else:
                results[pos].skipped_duplicates += len(unique)
                out[pos] = results[pos]
        if unknown:
            try:
                markers = self.schemas.ensure_markers()
                lookups = self.queries.lookup_markers_many(markers, {jobs[p].ref.table: ids for p, ids in unknown.items()})
            except Exception as exc:
                out.update((p, exc) for p in unknown)
            else:
                attempts = {pos: uuid.uuid4().hex[:12] for pos in unknown}
                claimed, claimed_at = self._claim(markers, jobs, unknown, lookups, attempts, out)
                fences = {
                    pos: OwnerFence(markers, jobs[pos].ref.table, tuple(ids), attempts[pos], claimed_at)
                    for pos, ids in claimed.items()
                }
                staged = self._stage(jobs, uniques, claimed, lookups, fences, results, out)
                self._write(markers, jobs, staged, results, out)
        return [out[p] for p in range(len(jobs))]

    def _claim(
        self,
        markers: TableRef,
        jobs: list[_TableApply],
        unknown: dict[int, list[str]],
        lookups: dict[str, MarkerLookup],
        attempts: dict[int, str],
        out: dict[int, ApplyResult | Exception],
    ) -> tuple[dict[int, list[str]], dt.datetime]:
        """This attempt's intents, with its token, in one write before anything is cleaned
        up or written, and their time: the newest intent of an id names the attempt that
        owns it. An older attempt still running (a replica whose lease ran out) sees that
        and stops before its commit and its `done` (`_check_owner`), and its DML jobs,
        even run late, change nothing (`OwnerFence`)."""
        claims = {
            pos: [i for i in ids if i not in lookups[jobs[pos].ref.table].done] for pos, ids in unknown.items()
        }
        try:
            claimed_at = self._write_markers(
                markers, [(jobs[p].ref.table, ids, attempts[p]) for p, ids in claims.items() if ids], INTENT
            )
        except Exception as exc:
            out.update((p, exc) for p in claims)
            return {}, dt.datetime.now(dt.timezone.utc)
        return claims, claimed_at

    def _stage(
        self,
        jobs: list[_TableApply],
        uniques: list[dict[str, Envelope]],
        unknown: dict[int, list[str]],
        lookups: dict[str, MarkerLookup],
        fences: dict[int, OwnerFence],
        results: list[ApplyResult],
        out: dict[int, ApplyResult | Exception],
    ) -> dict[int, _Staged]:
        """Per table, tables in parallel (table creation and schema reads are round trips):
        what the lookup says is left to do, planned and converted, its schema brought up
        to the plan, leftovers of unfinished attempts cleaned up."""
        absent = self._absent([jobs[pos].ref.table for pos in unknown])
        done = self._in_parallel(
            {
                pos: functools.partial(
                    self._stage_one, jobs[pos], uniques[pos], ids, lookups[jobs[pos].ref.table], fences[pos], results[pos],
                    jobs[pos].ref.table in absent,
                )
                for pos, ids in unknown.items()
            }
        )  # fmt: skip
        staged: dict[int, _Staged] = {}
        for pos, outcome in done.items():
            if isinstance(outcome, _Staged):
                staged[pos] = outcome
            else:
                out[pos] = outcome
        return staged

    def _absent(self, tables: list[str]) -> set[str]:
        """Tables new to the schema cache that one listing says are missing (`TableSchemas.absent`)."""
        try:
            return self.schemas.absent(tables)
        except Exception as exc:  # only a hint: each table's own read reports the error
            log.debug("listing the tables of %s failed: %s", self.dataset, exc)
            return set()

    def _stage_one(
        self,
        job: _TableApply,
        unique: dict[str, Envelope],
        ids: list[str],
        lookup: MarkerLookup,
        fence: OwnerFence,
        result: ApplyResult,
        listed_absent: bool = False,
    ) -> _Staged | ApplyResult:
        self._remember_done(lookup.done)
        wanted = set(ids)
        todo = [e for i, e in unique.items() if i in wanted and i not in lookup.done]
        result.skipped_duplicates += len(unique) - len(todo)
        if not todo:
            return result
        plan, state, created, writes, oversized = self._plan_and_prepare_schema(
            job.ref, todo, job.refused, fence, listed_absent
        )
        unfinished = {i: at for i, at in lookup.unfinished.items() if i in unique}
        todo_ids = [e.dedup_id for e in todo]
        if unfinished and state is not None and not created:  # a table created just now holds no leftovers
            # an earlier attempt's DML job may still run: it ends before anything is cleaned or rewritten
            self.client.settle_jobs(table_job_prefix(job.ref), f"earlier attempts in {job.ref.table}")
            self.writer.settle(job.ref.table)  # and a commit of theirs whose outcome is unknown
            self._clean_unfinished(job.ref, state, unfinished, fence)
        return _Staged(todo_ids, plan, writes, oversized, fence.attempt)

    def _write(
        self,
        markers: TableRef,
        jobs: list[_TableApply],
        staged: dict[int, _Staged],
        results: list[ApplyResult],
        out: dict[int, ApplyResult | Exception],
    ) -> None:
        """The staged tables' data in parallel, then, if this attempt still owns them, one done write."""
        if not staged:
            return
        # each table's steps up to its first insert, staged but not committed; one owner
        # check for all of them; then the commits and the steps after
        started = self._in_parallel(
            {p: functools.partial(self._write_until_commit, jobs[p].ref, s, results[p]) for p, s in staged.items()}
        )
        waiting = {p: got for p, got in started.items() if not isinstance(got, Exception)}
        out.update((p, got) for p, got in started.items() if isinstance(got, Exception))
        to_check = {jobs[p].ref.table: (staged[p].ids, staged[p].attempt) for p, (_, stream) in waiting.items() if stream}
        try:
            lost = self.queries.not_owned(markers, to_check) if to_check else set()
        except Exception as exc:
            out.update((p, exc) for p in waiting)
            return
        for p in [p for p in waiting if jobs[p].ref.table in lost]:
            out[p] = _superseded(jobs[p].ref.table)
            del waiting[p]
        written_or_failed = self._in_parallel(
            {
                p: functools.partial(self._write_rest, markers, jobs[p].ref, staged[p], results[p], start, stream)
                for p, (start, stream) in waiting.items()
            }
        )
        written_or_failed.update((p, exc) for p, exc in out.items() if p in staged and isinstance(exc, Exception))
        failed = {p: exc for p, exc in written_or_failed.items() if isinstance(exc, Exception)}
        out.update(failed)
        written = {p: s for p, s in staged.items() if p not in failed}
        if not written:
            return
        try:
            lost = self.queries.not_owned(markers, {jobs[p].ref.table: (s.ids, s.attempt) for p, s in written.items()})
        except Exception as exc:
            out.update((p, exc) for p in written)
            return
        for p in [p for p in written if jobs[p].ref.table in lost]:
            out[p] = _superseded(jobs[p].ref.table)
            del written[p]
        if not written:
            return
        try:
            self._write_markers(markers, [(jobs[p].ref.table, s.ids, s.attempt) for p, s in written.items()], DONE)
        except Exception as exc:
            out.update((p, exc) for p in written)
            return
        for p, s in written.items():
            self._remember_done(s.ids)
            result = results[p]
            result.applied_envelopes += len(s.ids)
            result.noop_deletes += s.plan.noop_deletes
            result.schema_changes += s.plan.schema_changes
            result.columns_widened += s.plan.columns_widened
            result.rejections.extend(s.plan.rejections)
            result.rejections.extend(s.oversized)
            out[p] = result

    def _in_parallel(self, calls: dict[int, Callable[[], Any]]) -> dict[int, Any]:
        """Run `calls` (one per table) at once, at most a connection's worth of threads;
        each one's return value, or the exception it raised."""
        if len(calls) == 1:
            (key, call), = calls.items()
            try:
                return {key: call()}
            except Exception as exc:
                return {key: exc}
        futures = {key: self._appliers().submit(call) for key, call in calls.items()}
        outcomes: dict[int, Any] = {}
        for key, future in futures.items():
            exc = future.exception()
            if exc is not None and not isinstance(exc, Exception):  # KeyboardInterrupt and the like: not a table's
                raise exc
            outcomes[key] = exc if exc is not None else future.result()
        return outcomes

    def _appliers(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._appliers_lock:
            if self._applier_pool is None:
                self._applier_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.settings.bigquery_write_connections, thread_name_prefix="bigquery-apply"
                )
            return self._applier_pool

    def _clean_unfinished(
        self, ref: TableRef, state: TableState, unfinished: dict[str, dt.datetime], fence: OwnerFence
    ) -> None:
        """Remove rows of earlier attempts that wrote an intent but never completed."""
        since = min(unfinished.values()) - CLOCK_SKEW_MARGIN
        n = self.queries.clean(ref, list(unfinished), since, partitioned=state.partitioned_by_ingestion, fence=fence)
        if n:
            log.warning("removed %d rows left by unfinished attempts of %s in %s", n, list(unfinished), ref.table)

    def _write_until_commit(self, ref: TableRef, staged: _Staged, result: ApplyResult) -> tuple[int, StagedStream | None]:
        """The table's steps in plan order up to its first insert, which is staged but not
        committed: (the position of that insert, its stream; None when there is none)."""
        for step, (kind, payload, count) in enumerate(staged.writes):
            if kind == "insert":
                return step, self._stage_insert(ref, payload)
            self._run_step(ref, step, kind, payload, count, result, staged)
        return len(staged.writes), None

    def _write_rest(
        self, markers: TableRef, ref: TableRef, staged: _Staged, result: ApplyResult, start: int, first: StagedStream | None
    ) -> None:
        """Commit the staged insert at `start` (the owner check passed), then the steps after
        it; a later insert is checked again just before its commit."""
        writes = staged.writes
        if start < len(writes):
            if first is not None:
                self.writer.commit(first)
            result.rows_inserted += writes[start][2]
            start += 1
        for step in range(start, len(writes)):
            kind, payload, count = writes[step]
            if kind == "insert":
                stream = self._stage_insert(ref, payload)
                self._check_owner(markers, ref, staged.ids, staged.attempt)
                if stream is not None:
                    self.writer.commit(stream)
                result.rows_inserted += count
            else:
                self._run_step(ref, step, kind, payload, count, result, staged)

    def _stage_insert(self, ref: TableRef, payload: Any) -> StagedStream | None:
        requests, sent = payload
        try:
            return self.writer.stage(ref.path, ref.table, requests)
        except errors.TerminalWarehouseError as exc:
            self._wait_for_widened_type(ref, requests, exc)
            if not isinstance(exc, errors.RowsRefusedError):
                raise
            sources = sent.sources()
            reasons = {sources[row]: f"BigQuery refused the row: {why}" for row, why in exc.row_errors.items()}
            raise _RowsRefused(reasons) from exc

    def _wait_for_widened_type(self, ref: TableRef, requests: list[ArrowRequest], exc: Exception) -> None:
        """A refused append that carries a column widened lately: the write stream may
        still see the old type (type_lag.py), so the table waits instead of dead-lettering."""
        names = pa.ipc.read_schema(pa.py_buffer(requests[0].schema)).names if requests else []
        pending = self.recent_widenings.pending(ref.table, names)
        if pending:
            raise errors.SchemaPendingError(
                f"BigQuery write stream of {ref.table} may not see the widened type of {pending} yet: {exc}",
                retry_after=errors.SCHEMA_PENDING_RETRY_SECONDS,
            ) from exc

    def _run_step(
        self, ref: TableRef, step: int, kind: str, payload: Any, count: int, result: ApplyResult, staged: _Staged
    ) -> None:
        """An insertAll (not fenced: the legacy path), a run of deletes or a run of upserts
        (fenced in the statement: see `OwnerFence`)."""
        if kind == "insert_all":
            self.insert_all.insert(ref.api, ref.table, payload)
            result.rows_inserted += count
            return
        if kind == "upsert":
            for n, (sql, params) in enumerate(payload):
                job_id = dml_job_id(ref, staged.ids, f"upsert{step}-{n}", staged.attempt)
                self.queries.dml(sql, params, job_id, f"upsert into {ref.table}")
            result.rows_upserted += count
            return
        for n, (sql, params) in enumerate(payload):
            job_id = dml_job_id(ref, staged.ids, f"delete{step}-{n}", staged.attempt)
            result.rows_deleted += self.queries.dml(sql, params, job_id, f"delete from {ref.table}")

    def _plan_and_prepare_schema(
        self,
        ref: TableRef,
        todo: list[Envelope],
        refused: dict[tuple[str, int], str],
        fence: OwnerFence,
        listed_absent: bool = False,
    ) -> tuple[planner.Plan, TableState | None, bool, list[tuple[str, Any, int]], list[Rejection]]:
        """Plan, convert every value, and bring the table's schema up to the plan.

        Re-planned when another writer changed the table under us. `listed_absent`: a
        listing of the dataset just lacked the table, so it is planned as missing without
        reading it; if it exists after all, its create is refused and it is read then.
        """
        state = None if listed_absent else self.schemas.state(ref.table)
        for _ in range(SCHEMA_RETRIES):
            plan = self._plan(ref.table, state, todo, refused)
            new_columns: list[planner.Column] = []
            widened: list[tuple[str, str, str]] = []  # type widening (widening.py)
            create = False
            declare_key = False
            for step in plan.steps:
                if isinstance(step, planner.WidenColumns):
                    widened.extend(step.columns)
                if isinstance(step, planner.CreateTable):
                    create = True
                    declare_key = step.key is not None
                    new_columns.extend(step.columns)
                elif isinstance(step, planner.AddColumns):
                    new_columns.extend(step.columns)
            if listed_absent and not create:
                # nothing here would create it (deletes only): read the table, a listing may lag
                listed_absent = False
                state = self.schemas.fetch(ref.table)
                continue
            try:
                writes, oversized = self._prepare(ref, plan, todo, fence)
            except (ValueError, TypeError, ArithmeticError, OverflowError) as exc:
                raise TerminalWarehouseError(f"value BigQuery cannot take in {ref.table}: {exc}") from exc
            try:
                if create:
                    state = self.schemas.create(ref, new_columns, plan.new_key, declare_key)
                elif state is not None and (new_columns or not state.has_dedup_column):
                    state = self.schemas.add_columns(ref, state, new_columns)
                if widened and state is not None:
                    state = self.schemas.widen(ref, widened)
                    self.recent_widenings.note(ref.table, [name for name, _, _ in widened])
                if plan.new_key is not None and state is not None and state.schema.key != plan.new_key:
                    state = self.schemas.record_key(ref, state, plan.new_key)  # before any row is upserted
                return plan, state, create, writes, oversized  # state None: only deletes on a missing table
            except SchemaRaced as raced:
                log.info("schema of %s changed concurrently (%s); re-reading", ref.table, raced)
                listed_absent = False
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
        schema = planner.Schema(state.schema, state.schema.key) if state is not None else None
        plan = planner.plan_table(table, schema, planned, self.capabilities.widenings, upserts=self.capabilities.upserts)
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
        self, ref: TableRef, plan: planner.Plan, todo: list[Envelope], fence: OwnerFence
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
                statements = self.queries.delete_statements(ref, step, fence, partitioned=self._partitioned(ref.table))
                writes.append(("delete", statements, len(step.conditions)))
            elif isinstance(step, planner.UpsertRows):
                statements = upsert_statements(ref, step, self.types, fence, partitioned=self._partitioned(ref.table))
                writes.append(("upsert", statements, step.count))
        return writes, oversized

    def _partitioned(self, table: str) -> bool:
        """Whether `table` is partitioned by ingestion time (a table created by this apply: as the settings say)."""
        state = self.schemas.state(table)
        return state.partitioned_by_ingestion if state is not None else self.schemas.partitioning == "day"

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

    def _check_owner(self, markers: TableRef, ref: TableRef, ids: list[str], attempt: str) -> None:
        """Raise unless `attempt` still owns `ids` of `ref` (its intent is the newest, none done)."""
        if self.queries.not_owned(markers, {ref.table: (ids, attempt)}):
            raise _superseded(ref.table)

    def _write_markers(self, markers: TableRef, per_table: list[tuple[str, list[str], str]], state: str) -> dt.datetime:
        """One marker write (`state`) for the ids of several tables: (table, ids, attempt
        token); the markers' `marked_at`."""
        now = dt.datetime.now(dt.timezone.utc)
        rows_of = [(table, i, attempt) for table, ids, attempt in per_table for i in ids]
        if not rows_of:
            return now
        if self.insert_mode == "insert_all":
            rows = [
                {"dedup_id": i, "table_name": t, "state": state, "marked_at": now.isoformat(), "attempt": a}
                for t, i, a in rows_of
            ]
            row_ids = [insert_id(f"{t}\x00{i}\x00{a}", 0 if state == INTENT else 1) for t, i, a in rows_of]
            self.insert_all.insert(
                markers.api, MARKERS_TABLE, self.insert_all.chunks(rows, row_ids, [len(i) + 200 for _, i, _ in rows_of])
            )
            return now
        n = len(rows_of)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array([i for _, i, _ in rows_of], pa.string()),
                pa.array([t for t, _, _ in rows_of], pa.string()),
                pa.array([state] * n, pa.string()),
                pa.array([now] * n, _MARKER_SCHEMA.field("marked_at").type),
                pa.array([a for _, _, a in rows_of], pa.string()),
            ],
            schema=_MARKER_SCHEMA,
        )
        requests, _ = split_rows(batch)
        self.writer.append(markers.default_stream, MARKERS_TABLE, requests)
        return now

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
                f"SELECT @t{i} AS t, COUNT(*) AS n FROM {self._ref(name).sql}{self._every_partition(name)}"
                for i, name in enumerate(chunk)
            )
            params = [bigquery.ScalarQueryParameter(f"t{i}", "STRING", name) for i, name in enumerate(chunk)]
            rows = self.client.query(sql, params, "query", "count rows")
            counts.update({row["t"]: int(row["n"]) for row in rows})
        return counts

    def _every_partition(self, table: str) -> str:
        """A WHERE clause keeping every row that a table requiring a partition filter accepts."""
        state = self.schemas.state(table)
        return f" WHERE {EVERY_PARTITION}" if state is not None and state.partitioned_by_ingestion else ""

    def table_schema(self, table: str) -> dict[str, str] | None:
        if check_applied_table_name(table) is not None:
            return None
        state = self.schemas.fetch(table)
        if state is None:
            return None
        return {name: typ for name, typ in state.schema.values()}

    # ----------------------------------------------------------------- table options (tables file)

    def apply_table_options(self, table: str, options: Mapping[str, Any]) -> OptionsOutcome | None:
        ref = self._ref(table)
        applies, not_applicable = applicable_options(self.capabilities, options)
        outcome = OptionsOutcome(not_applicable=not_applicable)
        with _table_lock((ref.project, ref.dataset, ref.table)):
            updated = apply_options(self.client, ref.api, applies, outcome)
            if updated is None:
                return None
            self.schemas.fetch(table)  # partitioning or clustering may have changed
        return outcome

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
        with self._appliers_lock:
            appliers, self._applier_pool = self._applier_pool, None
        if appliers is not None:
            appliers.shutdown(wait=True)
        self.writer.close()
        self.client.close()


@dataclass(slots=True)
class _TableApply:
    """One table's batch in `apply_many`: its slot in the outcomes, and rows BigQuery refused so far."""

    index: int
    ref: TableRef
    envelopes: list[Envelope]
    refused: dict[tuple[str, int], str] = field(default_factory=dict)


@dataclass(slots=True)
class _Staged:
    """A table ready to write: its planned and converted writes."""

    ids: list[str]  # dedup_ids applied now
    plan: planner.Plan
    writes: list[tuple[str, Any, int]]
    oversized: list[Rejection]
    attempt: str  # this try's token: in its markers, and in its DML jobs' ids


def _superseded(table: str) -> TransientWarehouseError:
    # another attempt (a redelivery to another replica, after this one's lease ran out)
    # claimed these ids since: this one commits nothing more and leaves `done` to it
    return TransientWarehouseError(f"BigQuery {table}: a newer attempt owns these messages; this one stops")


def _all_rejected(envelopes: Sequence[Envelope], reason: str) -> ApplyResult:
    result = ApplyResult()
    for env in envelopes:
        for i, act in enumerate(env.activities):
            result.rejections.append(Rejection(env.dedup_id, i, act, reason))
        result.applied_envelopes += 1
    return result


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
