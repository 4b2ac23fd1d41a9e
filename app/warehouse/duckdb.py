"""DuckDB warehouse: one local file, one writing process (the subscriber).

Exactly once: every `apply` runs in ONE transaction that records the call's dedup_ids
in `_ingest_applied` (a plain INSERT; if the primary key refuses one, the transaction
is retried with `INSERT OR IGNORE ... RETURNING`: an index probe per id either way, so
its cost does not grow with the table) and skips those already there, runs the planned
schema changes, inserts and deletes, and commits. Anything failing rolls back
everything: lock, disk and connection errors raise `TransientWarehouseError` (retry the
same messages later), anything else `TerminalWarehouseError` (the subscriber isolates
and eventually dead-letters the culprit). `_ingest_applied` rows older than `REDELIVERY_WINDOW_DAYS` (7 days:
Pub/Sub keeps an unacked message at most 7 days, so no redelivery comes later) are
pruned at most once an hour; a chunk re-published after that window would apply again.

Throughput: each apply is one COMMIT (a WAL fsync, ~1-3 ms), so give `apply` all the
pulled envelopes of a table at once; one 500-row envelope per call is fsync-bound.

Inserts arrive as the planner's Arrow table (`InsertRows.table`, each column in its
type's `arrow_type`), which DuckDB scans in place: one `INSERT ... SELECT` per run of
inserts, converting in SQL only WKT to GEOMETRY and JSON text to JSON; values never
become Python objects or SQL text. A run of deletes is one
semi-join per set of named columns against an Arrow batch of its keys (`DELETE ...
WHERE EXISTS`). The activity types of the columns are kept in
`_ingest_columns` (VARCHAR is ambiguous between string and bignumeric), maintained in
the same transaction as the DDL. Tables starting with `_ingest_` are internal.

Reads: `DuckDBWarehouse.query` runs one SELECT on the writer's database in a
transaction that is always rolled back (the subscriber serves it on its admin port);
`query_file` opens the file read-only when no subscriber holds it. Both switch off
`enable_external_access` after loading spatial, so a query cannot read or write other
files (read_csv, COPY, ATTACH). Spatial loads only where a geography column is: at connect
if a table has a GEOMETRY column, else the first apply naming one reconnects with it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import pyarrow as pa

from app.schema.columnar import to_arrow
from app.schema.types import TYPES
from app.settings import Settings
from app.warehouse.base import (
    ApplyResult,
    Capabilities,
    Envelope,
    Rejection,
    TerminalWarehouseError,
    TransientWarehouseError,
    QueryResult,
    Warehouse,
    WarehouseQueryError,
)
from app.warehouse.plan import (
    AddColumns,
    CreateTable,
    DeleteRows,
    InsertRows,
    Schema,
    Step,
    coalesce_steps,
    plan_table,
)

log = logging.getLogger(__name__)

INTERNAL_PREFIX = "_ingest_"
APPLIED_TABLE = "_ingest_applied"
# Tables applied in one transaction: one COMMIT (a WAL fsync) and one dedup claim for
# all of them, instead of one per table.
MAX_TABLES_PER_APPLY = 256
COLUMNS_TABLE = "_ingest_columns"
STAGE_VIEW = "_ingest_stage"  # connection-local Arrow view used while applying
REDELIVERY_WINDOW_DAYS = 7
PRUNE_EVERY_SECONDS = 3600.0

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Errors that say nothing about the data: retry the same messages later.
_TRANSIENT_ERRORS = (
    duckdb.IOException,
    duckdb.FatalException,
    duckdb.ConnectionException,
    duckdb.TransactionException,
    duckdb.OutOfMemoryException,
    TransientWarehouseError,
)


class _SpatialNeeded(Exception):
    """An apply names a geography column but the connection has not loaded spatial (yet)."""


class _SeenBefore(Exception):
    """Some dedup_id of the apply is recorded already: claim again, skipping those."""


class _TableFailed(Exception):
    """One table of a shared transaction failed: everything was rolled back."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


def _names_geography(steps: Sequence[Step]) -> bool:
    for step in steps:
        if isinstance(step, DeleteRows):
            if any(typ == "geography" for conds in step.conditions for _, typ, _ in conds):
                return True
        elif any(typ == "geography" for _, typ in step.columns):
            return True
    return False


class DuckDBFileLocked(WarehouseQueryError):
    """`query_file` could not open the file: a writer (the subscriber) holds its lock."""


def quote_ident(name: str) -> str:
    """Double-quote an identifier after checking it is a plain name (defence in depth)."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"refusing identifier {name!r}")
    return '"' + name + '"'


# --------------------------------------------------------------------------- type table


@dataclass(frozen=True, slots=True)
class DuckType:
    """How one activity type is stored and compared in DuckDB.

    Values arrive as Arrow in `TYPES[t].arrow_type`, which DuckDB scans natively for
    every type but two: GEOMETRY from WKT and JSON from its text, done in SQL.
    `value_sql` / `compare_value_sql` turn a staged column or bound parameter (`{}`) into
    the column type; `compare_column_sql` is applied to the stored column in deletes.
    """

    sql_type: str
    value_sql: str = "{}"
    compare_column_sql: str = "{}"
    compare_value_sql: str | None = None  # default: value_sql

    def cmp_value(self, placeholder: str) -> str:
        return (self.compare_value_sql or self.value_sql).format(placeholder)


def duck_types(spatial: bool) -> dict[str, DuckType]:
    """How each activity type is stored and compared; column types come from `app.schema.types`.

    Geography is GEOMETRY with the spatial extension, else its canonical WKT as VARCHAR.
    """
    table = {name: DuckType(spec.duckdb_type) for name, spec in TYPES.items()}
    if spatial:
        # GEOMETRY equality compares the WKB, so "POINT(1 2)" matches "POINT (1 2)".
        table["geography"] = DuckType(TYPES["geography"].duckdb_type, value_sql="ST_GeomFromText({})")
    else:
        table["geography"] = DuckType("VARCHAR")
    json = TYPES["record"].duckdb_type
    table["record"] = DuckType(
        json,
        value_sql=f"CAST({{}} AS {json})",
        compare_column_sql="CAST({} AS VARCHAR)",
        compare_value_sql=f"CAST(CAST({{}} AS {json}) AS VARCHAR)",
    )
    return table


def key_param(typ: str, value: Any) -> Any:
    """A canonical value as a bound parameter: the Python value of its Arrow form
    (Decimal, datetime, bytes, ...), which DuckDB binds as the column's type."""
    return to_arrow(typ, [value])[0].as_py()


def _reverse_types() -> dict[str, str]:
    """information_schema data_type -> activity type, for columns missing from _ingest_columns.

    VARCHAR reads as string (bignumeric is VARCHAR too; `_ingest_columns` tells them apart).
    """
    reverse: dict[str, str] = {}
    for name, spec in TYPES.items():
        reverse.setdefault(spec.duckdb_type, name)
    reverse["TIMESTAMP WITH TIME ZONE"] = reverse[TYPES["timestamp"].duckdb_type]  # DuckDB's spelling of it
    return reverse


_REVERSE_TYPES = _reverse_types()


# --------------------------------------------------------------------------- connections


def spatial_extension_path() -> Path | None:
    try:
        import duckdb_extension_spatial
    except ImportError:
        return None
    path = (
        Path(duckdb_extension_spatial.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "spatial.duckdb_extension"
    )
    return path if path.exists() else None


def _load_spatial(con: duckdb.DuckDBPyConnection) -> tuple[bool, str]:
    """Load spatial offline: LOAD (already installed), else INSTALL from the wheel, else LOAD the file."""
    path = spatial_extension_path()
    attempts: list[Callable[[], None]] = [lambda: con.execute("LOAD spatial")]
    if path is not None:
        literal = "'" + str(path).replace("'", "''") + "'"
        attempts.append(lambda: (con.execute(f"INSTALL {literal}"), con.execute("LOAD spatial")))
        attempts.append(lambda: con.execute(f"LOAD {literal}"))
    last = "duckdb_extension_spatial is not installed"
    for attempt in attempts:
        try:
            attempt()
            return True, "spatial loaded"
        except duckdb.Error as exc:
            last = str(exc)
    return False, last


def _has_geometry_columns(con: duckdb.DuckDBPyConnection) -> bool:
    # GEOMETRY is a core type in DuckDB 1.5: the catalog reads without the extension.
    return con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE starts_with(data_type, 'GEOMETRY')"
    ).fetchone()[0] > 0


def _spatial_installed(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'").fetchone()
    return bool(row and row[0])


def _open(
    path: Path,
    read_only: bool,
    memory_limit: str | None = None,
    spatial: bool | None = None,
    threads: int | None = None,
) -> tuple[duckdb.DuckDBPyConnection, bool | None]:
    """Connect; load spatial if `spatial`, or (None) if some table has a GEOMETRY column.

    Returns the connection and whether spatial loaded: True, False (unavailable), or None
    (not needed, but available). It cannot be loaded later on this connection: loading is
    external access, switched off here.
    """
    con = duckdb.connect(str(path), read_only=read_only)
    loaded: bool | None = None
    try:
        if memory_limit:
            # DuckDB's buffer pool defaults to 80% of RAM; the subscriber streams batches
            # and needs little, so cap it (bigger work spills to a temp file instead).
            con.execute(f"SET memory_limit = '{_memory_limit_literal(memory_limit)}'")
        if threads:
            # The subscriber's appends are too small to gain from parallel workers, which
            # compete with its own threads and each keep buffers (see DUCKDB_THREADS).
            con.execute(f"SET threads = {int(threads)}")
        # Loading costs ~0.3 s and memory: only when a geography column exists or arrives.
        if spatial or (spatial is None and _has_geometry_columns(con)):
            loaded, detail = _load_spatial(con)
            if not loaded:
                log.warning("DuckDB spatial extension unavailable (%s): geography stored as WKT text", detail)
        elif spatial_extension_path() is None and not _spatial_installed(con):
            loaded = False
        con.execute("SET TimeZone = 'UTC'")
        # Queries can reach the file system through table functions (read_csv, COPY
        # sources, ATTACH); the warehouse never needs that, so switch it off.
        con.execute("SET enable_external_access = false")
    except BaseException:
        con.close()
        raise
    return con, loaded


def _memory_limit_literal(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", value.strip(), flags=re.I):
        raise ValueError(f"DUCKDB_MEMORY_LIMIT must look like 256MB, got {value!r}")
    return value.strip()


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


def _check_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    if len(statements) != 1:
        raise WarehouseQueryError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        raise WarehouseQueryError(f"only read-only SELECT queries are allowed, got {kind.name}")


def _run_read_only(cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None) -> QueryResult:
    _check_select(cur, sql)
    cur.execute("BEGIN TRANSACTION")
    try:
        result = cur.execute(sql, list(params) if params else None)
        types = [str(d[1]) for d in result.description or []]
        arrow = result.to_arrow_table()
        names = list(arrow.column_names)
        rows = list(zip(*(col.to_pylist() for col in arrow.columns))) if arrow.num_columns else []
        return QueryResult(names, rows, types)
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    finally:
        try:
            cur.execute("ROLLBACK")
        except duckdb.Error:
            pass


def query_file(path: str | os.PathLike[str], sql: str, params: Sequence[Any] | None = None) -> QueryResult:
    """Run one SELECT on a DuckDB warehouse file opened read-only (no subscriber running).

    Raises `DuckDBFileLocked` if a writer holds the file (query the subscriber's admin
    port instead) and `WarehouseQueryError` for a missing file or a failing query.
    """
    path = Path(path)
    if not path.exists():
        raise WarehouseQueryError(f"no DuckDB warehouse at {path}")
    try:
        con, _ = _open(path, read_only=True)
    except duckdb.Error as exc:
        if _is_lock_error(exc):
            raise DuckDBFileLocked(
                f"{path} is locked by another process (a running subscriber); "
                "query through the subscriber's admin port instead"
            ) from exc
        raise WarehouseQueryError(f"cannot open {path}: {exc}") from exc
    try:
        return _run_read_only(con, sql, params)
    finally:
        con.close()


def _read_schema(con: duckdb.DuckDBPyConnection, table: str) -> Schema | None:
    rows = con.execute(
        f"""SELECT c.column_name, c.data_type, m.activity_type
            FROM information_schema.columns c
            LEFT JOIN {COLUMNS_TABLE} m
              ON m.table_name = lower(c.table_name) AND lower(m.column_name) = lower(c.column_name)
            WHERE c.table_schema = 'main' AND lower(c.table_name) = lower(?)
            ORDER BY c.ordinal_position""",
        [table],
    ).fetchall()
    if not rows:
        return None
    schema: Schema = {}
    for name, data_type, activity_type in rows:
        typ = activity_type or _REVERSE_TYPES.get(str(data_type).upper(), f"unsupported:{data_type}")
        schema[name.lower()] = (name, typ)
    return schema


def table_schema_file(path: str | os.PathLike[str], table: str) -> dict[str, str] | None:
    """`Warehouse.table_schema` on a file opened read-only (no subscriber running).

    None if the file or the table does not exist; `DuckDBFileLocked` if a writer holds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        con, _ = _open(path, read_only=True)
    except duckdb.Error as exc:
        if _is_lock_error(exc):
            raise DuckDBFileLocked(f"{path} is locked by another process (a running subscriber)") from exc
        raise WarehouseQueryError(f"cannot open {path}: {exc}") from exc
    try:
        has_columns_table = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND table_name = ?", [COLUMNS_TABLE]
        ).fetchone()[0]
        schema = _read_schema(con, table) if has_columns_table else None
    except duckdb.Error as exc:
        raise WarehouseQueryError(str(exc)) from exc
    finally:
        con.close()
    return None if schema is None else {name: typ for name, typ in schema.values()}


# --------------------------------------------------------------------------- warehouse


class DuckDBWarehouse(Warehouse):
    def __init__(self, settings: Settings) -> None:
        self.path = Path(settings.duckdb_file)
        self._memory_limit = settings.duckdb_memory_limit
        self._threads = settings.duckdb_threads
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
        self._schemas: dict[str, Schema] = {}
        self.capabilities = Capabilities(
            name="duckdb", transactional=True, max_alters_per_statement=1, supports_geometry=self._spatial,
            concurrent_tables=False,  # one connection, not thread-safe
            max_tables_per_apply=MAX_TABLES_PER_APPLY,
        )
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
                con, loaded = _open(
                    self.path,
                    read_only=False,
                    memory_limit=self._memory_limit,
                    spatial=True if spatial else None,
                    threads=self._threads,
                )
            except duckdb.Error as exc:
                raise TransientWarehouseError(f"cannot open DuckDB file {self.path}: {exc}") from exc
            except OSError as exc:
                raise TransientWarehouseError(f"cannot create {self.path.parent}: {exc}") from exc
            try:
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS {APPLIED_TABLE} "
                    "(dedup_id VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
                )
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS {COLUMNS_TABLE} (table_name VARCHAR NOT NULL, "
                    "column_name VARCHAR NOT NULL, activity_type VARCHAR NOT NULL, "
                    "PRIMARY KEY (table_name, column_name))"
                )
            except duckdb.Error as exc:
                con.close()
                raise TransientWarehouseError(f"cannot prepare {self.path}: {exc}") from exc
            self._spatial_loaded = bool(loaded)
            available = loaded is not False
            if available != self._spatial:
                self._spatial = available
                self._types = duck_types(available)
                self.capabilities = Capabilities(
                    name="duckdb", transactional=True, max_alters_per_statement=1, supports_geometry=available,
                    concurrent_tables=False, max_tables_per_apply=MAX_TABLES_PER_APPLY,
                )
            self._con = con
            return con

    def _drop_connection(self) -> None:
        self._schemas.clear()
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except duckdb.Error:
                pass

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

    # -- schema -------------------------------------------------------------------------

    def _schema(self, con: duckdb.DuckDBPyConnection, table: str) -> Schema | None:
        return _read_schema(con, table)

    def table_schema(self, table: str) -> dict[str, str] | None:
        with self._lock:
            con = self._connection()
            try:
                schema = self._schema(con, table)
            except duckdb.Error as exc:
                raise TransientWarehouseError(str(exc)) from exc
        return None if schema is None else {name: typ for name, typ in schema.values()}

    # -- apply ----------------------------------------------------------------------------

    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        result = ApplyResult()
        if not envelopes:
            return result
        if not _IDENT.match(table) or table.lower().startswith(INTERNAL_PREFIX):
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
                except _SpatialNeeded:
                    spatial = True  # rolled back: plan again on a connection with spatial
                except _SeenBefore:
                    all_new = False  # rolled back: claim again, skipping ids applied before
        raise TerminalWarehouseError(f"DuckDB apply to {table} kept restarting")  # pragma: no cover

    def _apply_once(self, table: str, envelopes: Sequence[Envelope], spatial: bool, all_new: bool) -> ApplyResult:
        result = ApplyResult()
        with self._lock:
            con = self._connection(spatial)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    schema = self._apply_in_transaction(con, table, envelopes, result, all_new)
                    con.execute("COMMIT")
                    if schema is not None:
                        self._schemas[table.lower()] = schema
                except BaseException:
                    self._schemas.clear()
                    try:
                        con.execute("ROLLBACK")
                    except duckdb.Error:
                        pass
                    raise
            except (_SpatialNeeded, _SeenBefore):
                raise
            except Exception as exc:
                raise self._translate(exc, table) from exc
            finally:
                try:
                    con.unregister(STAGE_VIEW)
                except duckdb.Error:
                    pass
            self._maybe_prune(con)
        return result

    def apply_many(self, batches: Sequence[tuple[str, Sequence[Envelope]]]) -> list[ApplyResult | Exception]:
        """All tables in one transaction: one dedup claim and one COMMIT for all of them.

        A table that fails inside it rolls everything back; that table is then applied
        alone (its own outcome), and the others go again together.
        """
        outcomes: list[ApplyResult | Exception | None] = [None] * len(batches)
        pending = [i for i, (table, envelopes) in enumerate(batches) if envelopes and self._allowed(table)]
        if len(pending) < 2:
            return super().apply_many(batches)
        for i in set(range(len(batches))) - set(pending):
            outcomes[i] = self._outcome(*batches[i])
        spatial, all_new = False, True
        with self._lock:
            while len(pending) > 1:
                try:
                    results = self._apply_group_once([batches[i] for i in pending], spatial, all_new)
                except _SpatialNeeded:
                    spatial = True  # rolled back: plan again on a connection with spatial
                    continue
                except _SeenBefore:
                    all_new = False  # rolled back: claim again, skipping ids applied before
                    continue
                except _TableFailed as failed:
                    alone = pending.pop(failed.position)
                    outcomes[alone] = self._outcome(*batches[alone])
                    continue
                except TransientWarehouseError as exc:  # nothing of any table committed
                    for i in pending:
                        outcomes[i] = exc
                    return outcomes  # type: ignore[return-value]
                except TerminalWarehouseError:
                    break  # not one table's fault (e.g. at COMMIT): each alone finds out
                for i, result in zip(pending, results):
                    outcomes[i] = result
                pending = []
            for i in pending:
                outcomes[i] = self._outcome(*batches[i])
        return outcomes  # type: ignore[return-value]

    def _outcome(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult | Exception:
        try:
            return self.apply(table, envelopes)
        except Exception as exc:
            return exc

    @staticmethod
    def _allowed(table: str) -> bool:
        return bool(_IDENT.match(table)) and not table.lower().startswith(INTERNAL_PREFIX)

    def _apply_group_once(
        self, group: list[tuple[str, Sequence[Envelope]]], spatial: bool, all_new: bool
    ) -> list[ApplyResult]:
        results = [ApplyResult() for _ in group]
        schemas: dict[str, Schema | None] = {}
        con = self._connection(spatial)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                unique = list(dict.fromkeys(env.dedup_id for _, envelopes in group for env in envelopes))
                new_ids = self._claim_ids(con, unique, all_new)
                for position, (table, envelopes) in enumerate(group):
                    todo = _first_of_new(envelopes, new_ids, results[position])
                    try:
                        schemas[table.lower()] = self._apply_table(con, table, todo, results[position])
                    except (_SpatialNeeded, _SeenBefore):
                        raise
                    except Exception as exc:
                        raise _TableFailed(position) from exc
                con.execute("COMMIT")
            except BaseException:
                self._schemas.clear()
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                raise
        except (_SpatialNeeded, _SeenBefore, _TableFailed):
            raise
        except Exception as exc:
            raise self._translate(exc, ", ".join(table for table, _ in group)) from exc
        finally:
            try:
                con.unregister(STAGE_VIEW)
            except duckdb.Error:
                pass
        self._schemas.update({name: schema for name, schema in schemas.items() if schema is not None})
        self._maybe_prune(con)
        return results

    def _translate(self, exc: Exception, tables: str) -> TransientWarehouseError | TerminalWarehouseError:
        """Everything was rolled back. Lock, disk and connection trouble is transient
        (retried in place, never dead-lettered). Anything else, e.g. a value DuckDB
        refuses, is terminal: the subscriber narrows it down to the message."""
        message = f"DuckDB apply to {tables} failed, rolled back: {type(exc).__name__}: {exc}"
        if isinstance(exc, _TRANSIENT_ERRORS):
            if isinstance(exc, (duckdb.IOException, duckdb.FatalException, duckdb.ConnectionException)):
                self._drop_connection()  # reconnect on the next apply
            return TransientWarehouseError(message)
        return TerminalWarehouseError(message)

    def _claim_ids(self, con: duckdb.DuckDBPyConnection, ids: list[str], all_new: bool) -> set[str]:
        """Record ids in `_ingest_applied` (same transaction); return those not recorded before.

        With `all_new` (the common case: no redelivery), a plain INSERT, ~5x cheaper than
        `INSERT OR IGNORE ... RETURNING` for hundreds of ids in DuckDB 1.5; if an id is
        there already the primary key refuses it and `_SeenBefore` asks for a retry
        without `all_new`. Either way each id is checked through the primary-key index, so
        the cost does not grow with the table (an `IN (...)` lookup scans it).
        """
        if all_new:
            try:
                con.register(STAGE_VIEW, pa.table({"c0": pa.array(ids, type=pa.string())}))
                con.execute(f"INSERT INTO {APPLIED_TABLE} SELECT c0, now() FROM {STAGE_VIEW}")
            except duckdb.ConstraintException as exc:
                raise _SeenBefore() from exc
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

    def _apply_in_transaction(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        envelopes: Sequence[Envelope],
        result: ApplyResult,
        all_new: bool,
    ) -> Schema | None:
        """Returns the table's schema after the apply (for the cache)."""
        unique = list(dict.fromkeys(env.dedup_id for env in envelopes))
        new_ids = self._claim_ids(con, unique, all_new)
        return self._apply_table(con, table, _first_of_new(envelopes, new_ids, result), result)

    def _apply_table(
        self, con: duckdb.DuckDBPyConnection, table: str, todo: list[Envelope], result: ApplyResult
    ) -> Schema | None:
        """Apply the (claimed, new) envelopes of one table inside the open transaction."""
        lower_table = table.lower()
        schema = self._schemas.get(lower_table)
        if schema is None:
            schema = self._schema(con, table)
        if not todo:
            return schema
        plan = plan_table(table, schema, todo)
        if self._spatial and not self._spatial_loaded and _names_geography(plan.steps):
            raise _SpatialNeeded()
        result.rejections.extend(plan.rejections)
        result.noop_deletes += plan.noop_deletes
        result.schema_changes += plan.schema_changes
        qtable = quote_ident(table)
        for step in coalesce_steps(plan.steps):
            if isinstance(step, InsertRows):
                result.rows_inserted += self._insert(con, qtable, step)
            elif isinstance(step, DeleteRows):
                result.rows_deleted += self._delete(con, qtable, step)
            elif isinstance(step, CreateTable):
                cols = ", ".join(f"{quote_ident(n)} {self._types[t].sql_type}" for n, t in step.columns)
                con.execute(f"CREATE TABLE {qtable} ({cols})")
                self._record_columns(con, lower_table, step.columns)
            elif isinstance(step, AddColumns):
                for n, t in step.columns:
                    con.execute(f"ALTER TABLE {qtable} ADD COLUMN {quote_ident(n)} {self._types[t].sql_type}")
                self._record_columns(con, lower_table, step.columns)
        result.applied_envelopes += len(todo)
        return plan.schema

    def _record_columns(self, con: duckdb.DuckDBPyConnection, table: str, columns: list[tuple[str, str]]) -> None:
        # one statement: executemany runs one INSERT OR REPLACE per column (~4 ms each)
        con.execute(
            f"INSERT OR REPLACE INTO {COLUMNS_TABLE} VALUES " + ", ".join(["(?, ?, ?)"] * len(columns)),
            [value for n, t in columns for value in (table, n, t)],
        )

    def _stage(self, con: duckdb.DuckDBPyConnection, columns: Sequence[pa.Array | pa.ChunkedArray]) -> None:
        """Register Arrow columns as STAGE_VIEW, named c0, c1, ... (DuckDB scans them in place)."""
        con.register(STAGE_VIEW, pa.Table.from_arrays(list(columns), names=[f"c{i}" for i in range(len(columns))]))

    def _insert(self, con: duckdb.DuckDBPyConnection, qtable: str, step: InsertRows) -> int:
        # One chunk per column: DuckDB scans each Arrow chunk on its own, and a run of
        # 500-row chunks (one per message) inserts half as fast; combining costs ~0.01 ms per 1k rows.
        self._stage(con, step.table.combine_chunks().columns)
        targets = ", ".join(quote_ident(name) for name, _ in step.columns)
        exprs = ", ".join(self._types[typ].value_sql.format(f"c{i}") for i, (_, typ) in enumerate(step.columns))
        con.execute(f"INSERT INTO {qtable} ({targets}) SELECT {exprs} FROM {STAGE_VIEW}")
        con.unregister(STAGE_VIEW)
        return step.count

    def _delete(self, con: duckdb.DuckDBPyConnection, qtable: str, step: DeleteRows) -> int:
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
        return sum(self._delete_keys(con, qtable, columns, keys) for columns, keys in groups.items())

    def _delete_keys(
        self,
        con: duckdb.DuckDBPyConnection,
        qtable: str,
        columns: tuple[tuple[str, str], ...],
        keys: list[tuple[Any, ...]],
    ) -> int:
        def match(key_sql: Callable[[int], str]) -> str:
            return " AND ".join(
                f"{self._types[typ].compare_column_sql.format(qtable + '.' + quote_ident(name))} "
                f"IS NOT DISTINCT FROM {self._types[typ].cmp_value(key_sql(i))}"
                for i, (name, typ) in enumerate(columns)
            )

        if len(keys) == 1:
            # One key: bound parameters filter the scan directly, ~3x faster than registering
            # a one-row Arrow table and joining it (a lone delete between inserts is common).
            params = [key_param(typ, value) for (_, typ), value in zip(columns, keys[0])]
            return con.execute(f"DELETE FROM {qtable} WHERE {match(lambda i: '?')}", params).fetchone()[0]
        self._stage(con, [to_arrow(typ, list(values)) for (_, typ), values in zip(columns, zip(*keys))])
        count = con.execute(
            f"DELETE FROM {qtable} WHERE EXISTS (SELECT 1 FROM {STAGE_VIEW} k WHERE {match(lambda i: f'k.c{i}')})"
        ).fetchone()[0]
        con.unregister(STAGE_VIEW)
        return count

    def _maybe_prune(self, con: duckdb.DuckDBPyConnection) -> None:
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
            return _run_read_only(cur, sql, params)
        finally:
            cur.close()


def _first_of_new(envelopes: Sequence[Envelope], new_ids: set[str], result: ApplyResult) -> list[Envelope]:
    """The envelopes whose dedup_id was just claimed (each id once; consumed from `new_ids`);
    the others are counted as skipped duplicates."""
    todo: list[Envelope] = []
    for env in envelopes:
        if env.dedup_id in new_ids:
            new_ids.discard(env.dedup_id)  # the same id twice in one call applies once
            todo.append(env)
        else:
            result.skipped_duplicates += 1
    return todo
