"""`DuckDBWarehouse`: one local file, one writing process (the subscriber).

Every `apply` runs in ONE transaction: the writer (`apply.py`) claims the call's
dedup_ids, runs the planned schema changes, inserts and deletes, and it commits.
Anything failing rolls back everything and is translated once (`errors.py`): transient
(retry the same messages later) or terminal (the subscriber isolates and eventually
dead-letters the culprit). `_ingest_applied` rows older than `REDELIVERY_WINDOW_DAYS`
(7 days: Pub/Sub keeps an unacked message at most 7 days, so no redelivery comes later)
are pruned at most once an hour; a chunk re-published after that window would apply again.

Throughput: each apply is one COMMIT (a WAL fsync, ~1-3 ms), so give `apply` all the
pulled envelopes of a table at once; one 500-row envelope per call is fsync-bound.
`apply_many` puts several tables in one transaction (one claim, one COMMIT); a table
failing in it rolls everything back, is applied alone, and the others go again together.

Reads: `query` runs one SELECT on the writer's database in a transaction that is
always rolled back (the subscriber serves it on its admin port); `DuckDBFileReader`
opens the file read-only when no subscriber holds it. Both switch off
`enable_external_access` after loading spatial, so a query cannot read or write other
files (read_csv, COPY, ATTACH). Spatial loads only where a geography column is: at connect
if a table has a GEOMETRY column, else the first apply naming one reconnects with it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb

from app.schema.identifiers import IDENTIFIER, takes_no_activities
from app.settings import Settings
from app.warehouse.base import (
    ApplyResult,
    Envelope,
    OptionsOutcome,
    QueryResult,
    Rejection,
    TerminalWarehouseError,
    TransientWarehouseError,
    Warehouse,
)
from app.warehouse.cache import LruCache
from app.warehouse.duckdb import catalog
from app.warehouse.duckdb.apply import SeenBefore, SpatialNeeded, TablePlan, Writer, first_of_new
from app.warehouse.duckdb.capabilities import duckdb_capabilities
from app.warehouse.duckdb.catalog import APPLIED_TABLE, STAGE_VIEW
from app.warehouse.duckdb.connection import open_connection, spatial_extension_path
from app.warehouse.duckdb.errors import apply_failed
from app.warehouse.duckdb.options import apply_options
from app.warehouse.duckdb.reads import run_read_only
from app.warehouse.duckdb.types import TYPE_MAPPER, duck_types
from app.warehouse.plan import Schema

log = logging.getLogger("app.warehouse.duckdb")

REDELIVERY_WINDOW_DAYS = 7
PRUNE_EVERY_SECONDS = 3600.0


class _TableFailed(Exception):
    """One table of a shared transaction failed; everything was rolled back."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


class DuckDBWarehouse(Warehouse):
    type_mapper = TYPE_MAPPER

    def __init__(self, settings: Settings) -> None:
        self.path = Path(settings.duckdb_file)
        self._memory_limit = settings.duckdb_memory_limit
        self._threads = settings.duckdb_threads
        self._block_size = settings.duckdb_block_size
        self._storage_version = settings.duckdb_storage_version
        self._reopen_after_tables = settings.duckdb_reopen_after_tables
        self._tables_written: set[str] = set()  # tables written on this connection
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        # Whether geography is GEOMETRY (spatial loads) or WKT text; refined on connect and
        # when a load fails. The extension loads only with the first geography column.
        self._spatial = spatial_extension_path() is not None
        self._spatial_loaded = False
        self._types = duck_types(self._spatial)
        self._last_prune = 0.0
        # Schemas of tables this process wrote, valid because it is the only writer (the
        # file lock); dropped on any error or reconnect so a retry re-reads the catalog.
        self._schemas: LruCache[str, Schema] = LruCache(settings.table_cache_size)
        # Lower-case names of the file's tables, read once per connection (same validity):
        # a table new to the file needs no catalog query (one costs ~36 ms on 1,000 tables).
        self._tables: set[str] | None = None
        self.capabilities = duckdb_capabilities(self._spatial)
        try:
            self._connection()
        except TransientWarehouseError as exc:
            log.warning("DuckDB not available yet, will retry on the next apply: %s", exc)

    # -- connection handling ------------------------------------------------------------

    def _connection(self, spatial: bool = False) -> duckdb.DuckDBPyConnection:
        """The writer's connection; with `spatial`, one that has loaded the extension.

        Spatial cannot be loaded into an open connection (external access is off), so
        the first geography column reconnects once; a query running on the old connection
        then fails with `WarehouseQueryError` (DuckDB interrupts it), and can be retried.
        """
        with self._lock:
            if self._con is not None:
                if not spatial or self._spatial_loaded:
                    return self._con
                self._drop_connection()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                con, loaded = open_connection(
                    self.path,
                    read_only=False,
                    memory_limit=self._memory_limit,
                    spatial=True if spatial else None,
                    threads=self._threads,
                    block_size=self._block_size,
                    storage_version=self._storage_version,
                )
            except duckdb.Error as exc:
                raise TransientWarehouseError(f"cannot open DuckDB file {self.path}: {exc}") from exc
            except OSError as exc:
                raise TransientWarehouseError(f"cannot create {self.path.parent}: {exc}") from exc
            try:
                catalog.create_bookkeeping(con)
            except duckdb.Error as exc:
                con.close()
                raise TransientWarehouseError(f"cannot prepare {self.path}: {exc}") from exc
            self._spatial_loaded = bool(loaded)
            available = loaded is not False
            if available != self._spatial:
                self._spatial = available
                self._types = duck_types(available)
                self.capabilities = duckdb_capabilities(available)
            self._con = con
            return con

    def _drop_connection(self) -> None:
        self._forget_catalog()
        self._close_connection()

    def _close_connection(self) -> None:
        self._tables_written = set()
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except duckdb.Error:
                pass

    def _forget_catalog(self) -> None:
        self._schemas.clear()
        self._tables = None

    def _table_names(self, con: duckdb.DuckDBPyConnection) -> set[str]:
        if self._tables is None:
            self._tables = catalog.table_names(con)
        return self._tables

    def ready(self) -> tuple[bool, str]:
        try:
            with self._lock:
                self._connection().execute("SELECT 1").fetchall()
        except (TransientWarehouseError, duckdb.Error) as exc:
            return False, str(exc)
        return True, "ok" if self._spatial else "ok (no spatial extension: geography stored as WKT)"

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    # -- catalog --------------------------------------------------------------------------

    def _read_catalog(self, read: Any) -> Any:
        with self._lock:
            con = self._connection()
            try:
                return read(con)
            except duckdb.Error as exc:
                raise TransientWarehouseError(str(exc)) from exc

    def table_schema(self, table: str) -> dict[str, str] | None:
        schema = self._read_catalog(lambda con: catalog.read_schema(con, table))
        return None if schema is None else {name: typ for name, typ in schema.values()}

    def list_tables(self) -> list[str]:
        return self._read_catalog(catalog.list_tables)

    def count_rows(self, tables: Sequence[str]) -> dict[str, int]:
        return self._read_catalog(lambda con: catalog.count_rows(con, tables))

    # -- table options (tables file) ---------------------------------------------------------

    def apply_table_options(self, table: str, options: Mapping[str, Any]) -> OptionsOutcome | None:
        def apply(con: duckdb.DuckDBPyConnection) -> OptionsOutcome | None:
            if catalog.read_schema(con, table) is None:
                return None
            return apply_options(con, table, options)

        return self._read_catalog(apply)

    # -- apply ----------------------------------------------------------------------------

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        result = ApplyResult()
        if not envelopes:
            return result
        if not IDENTIFIER.match(table) or takes_no_activities(table):
            reason = f"table name {table!r} is not allowed (reserved or invalid)"
            for env in envelopes:
                result.rejections.extend(Rejection(env.dedup_id, i, a, reason) for i, a in enumerate(env.activities))
            # Nothing to write: not recorded, a redelivery is rejected the same way.
            result.applied_envelopes = len(envelopes)
            return result
        spatial, all_new = False, True
        with self._lock:
            for _ in range(3):  # each retry switches one flag for good
                try:
                    return self._apply_once(table, envelopes, spatial, all_new)
                except SpatialNeeded:
                    spatial = True  # rolled back: plan again on a connection with spatial
                except SeenBefore:
                    all_new = False  # rolled back: claim again, skipping ids applied before
        raise TerminalWarehouseError(f"DuckDB apply to {table} kept restarting")  # pragma: no cover

    def _apply_once(self, table: str, envelopes: Sequence[Envelope], spatial: bool, all_new: bool) -> ApplyResult:
        """One table's transaction: the many-table one with a group of one."""
        try:
            [result] = self._apply_together([(table, envelopes)], spatial, all_new)
        except _TableFailed as failed:
            cause = failed.__cause__ if isinstance(failed.__cause__, Exception) else failed
            error, reconnect = apply_failed(cause, table)
            if reconnect:
                self._drop_connection()
            raise error from cause
        return result

    def apply_many(self, batches: Sequence[tuple[str, Sequence[Envelope]]]) -> list[ApplyResult | Exception]:
        outcomes: list[ApplyResult | Exception | None] = [None] * len(batches)
        together = [i for i, (table, envelopes) in enumerate(batches) if envelopes and self._allowed(table)]
        if len(together) < 2:
            return super().apply_many(batches)
        for i in sorted(set(range(len(batches))) - set(together)):
            outcomes[i] = self._outcome(*batches[i])
        spatial, all_new = False, True
        with self._lock:
            while len(together) > 1:
                try:
                    results = self._apply_together([batches[i] for i in together], spatial, all_new)
                except SpatialNeeded:
                    spatial = True  # rolled back: plan again on a connection with spatial
                    continue
                except SeenBefore:
                    all_new = False  # rolled back: claim again, skipping ids applied before
                    continue
                except _TableFailed as failed:
                    alone = together.pop(failed.position)
                    outcomes[alone] = self._outcome(*batches[alone])
                    continue
                except TransientWarehouseError as exc:  # nothing of any table committed
                    for i in together:
                        outcomes[i] = exc
                    together = []
                    break
                except TerminalWarehouseError:
                    break  # no one table's fault (e.g. at COMMIT): each alone finds out
                for i, result in zip(together, results):
                    outcomes[i] = result
                together = []
            for i in together:
                outcomes[i] = self._outcome(*batches[i])
        return outcomes  # type: ignore[return-value]

    def _outcome(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult | Exception:
        try:
            return self.apply(table, envelopes)
        except Exception as exc:
            return exc

    @staticmethod
    def _allowed(table: str) -> bool:
        return bool(IDENTIFIER.match(table)) and not takes_no_activities(table)

    def _apply_together(
        self, group: list[tuple[str, Sequence[Envelope]]], spatial: bool, all_new: bool
    ) -> list[ApplyResult]:
        """One transaction for the group's tables; `_TableFailed` names a table that failed."""
        results = [ApplyResult() for _ in group]
        schemas: dict[str, Schema] = {}
        con = self._connection(spatial)
        writer = Writer(con, self._types, self.options_for_new_table, upserts=self.capabilities.upserts)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                new_ids = writer.claim([env for _, envelopes in group for env in envelopes], all_new)
                existing = self._table_names(con)
                unknown = [table for table, _ in group if table.lower() not in self._schemas and table.lower() in existing]
                read = catalog.read_schemas(con, unknown) if unknown else {}
                known: list[Schema | None] = []
                plans: list[TablePlan | None] = []
                for position, (table, envelopes) in enumerate(group):  # plan every table first
                    known.append(self._schemas.get(table.lower()) or read.get(table.lower()))
                    try:
                        plans.append(writer.plan_table(
                            table,
                            first_of_new(envelopes, new_ids, results[position]),
                            known[position],
                            results[position],
                            spatial_missing=self._spatial and not self._spatial_loaded,
                        ))
                    except SpatialNeeded:
                        raise
                    except Exception as exc:
                        raise _TableFailed(position) from exc
                writer.stage([planned for planned in plans if planned is not None])
                for position, ((table, _), planned) in enumerate(zip(group, plans)):
                    try:
                        schema = known[position] if planned is None else writer.execute(table, planned, results[position])
                    except (SpatialNeeded, SeenBefore):
                        raise
                    except Exception as exc:
                        raise _TableFailed(position) from exc
                    if schema is not None:
                        schemas[table.lower()] = schema
                writer.finish()
                con.execute("COMMIT")
            except BaseException:
                self._forget_catalog()
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                raise
        except (SpatialNeeded, SeenBefore, _TableFailed):
            raise
        except Exception as exc:
            error, reconnect = apply_failed(exc, ", ".join(table for table, _ in group))
            if reconnect:
                self._drop_connection()
            raise error from exc
        finally:
            try:
                con.unregister(STAGE_VIEW)
            except duckdb.Error:
                pass
        self._schemas.update(schemas.items())
        if self._tables is not None:
            self._tables.update(schemas)
        self._tables_written.update(schemas)
        self._maybe_reopen()
        self._maybe_prune()
        return results

    def _maybe_reopen(self) -> None:
        """Close and reopen the file once `DUCKDB_REOPEN_AFTER_TABLES` distinct tables were
        written on this connection: memory grows with the tables touched, not the applies,
        so a stream over a few tables never reopens.

        DuckDB 1.5 keeps each table's rows written since the last checkpoint in memory it
        cannot evict (~90 KB a table however few rows; its own checkpoint waits for 16 MB of
        WAL), and ~30 KB a table it touched until the database closes: a stream over
        thousands of small tables filled `DUCKDB_MEMORY_LIMIT` and every apply then failed.
        Closing checkpoints and frees both; reopening loads tables lazily. The caches stay:
        the file lock is let go only between the close and the open, in this call.
        """
        if len(self._tables_written) < self._reopen_after_tables:
            return
        schemas, tables = self._schemas, self._tables
        self._close_connection()
        try:
            self._connection(spatial=self._spatial_loaded)
        except TransientWarehouseError as exc:
            log.warning("reopening the DuckDB file failed (the next apply tries again): %s", exc)
            self._forget_catalog()
            return
        self._schemas, self._tables = schemas, tables

    def _maybe_prune(self) -> None:
        """Forget dedup_ids older than the redelivery window (at most once per hour)."""
        now = time.monotonic()
        if self._last_prune and now - self._last_prune < PRUNE_EVERY_SECONDS:
            return
        self._last_prune = now
        self.prune_applied()

    def prune_applied(self, days: int = REDELIVERY_WINDOW_DAYS) -> int:
        """Delete `_ingest_applied` rows older than `days`; returns how many were removed."""
        with self._lock:
            try:
                con = self._connection()
                return con.execute(
                    f"DELETE FROM {APPLIED_TABLE} WHERE applied_at < now() - to_days(?)", [int(days)]
                ).fetchone()[0]
            except (duckdb.Error, TransientWarehouseError) as exc:
                log.warning("pruning %s failed (will retry later): %s", APPLIED_TABLE, exc)
                return 0

    # -- read path --------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        """One read-only SELECT, on its own cursor (safe from another thread), always rolled back."""
        with self._lock:
            cur = self._connection().cursor()
        try:
            cur.execute("SET TimeZone = 'UTC'")
            return run_read_only(cur, sql, params)
        finally:
            cur.close()
