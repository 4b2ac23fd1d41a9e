"""BigQuery warehouse: Storage Write API inserts, parameterized DML deletes, schema patches.

How one `apply(table, envelopes)` runs (all under a per-table lock, so one process never
writes a table from two threads at once):

1. **Dedup check**: one query on `_ingest_applied` for all the envelopes' `dedup_id`s
   (skipped when an in-process cache already knows them all). Envelopes already applied
   are skipped; a dedup_id repeated inside the batch is applied once.
2. **Plan** with the shared planner (`app.warehouse.plan`): inserts merged, deletes as
   barriers, type conflicts and unknown delete columns become `Rejection`s. All values
   are converted (Arrow arrays / JSON rows / query parameters) *before* anything is
   written, so a value BigQuery cannot take fails the batch with nothing committed.
3. **Schema**: the plan's schema steps are hoisted and merged (adding a nullable column
   earlier changes no result): a missing table is created, new columns are added with
   ONE table-schema patch (`tables.patch`, with the etag) per batch of new columns. The
   schema is cached per table, so the metadata-update quota (5 per 10 s per table) is
   only spent when columns really are new. When another subscriber changed the table
   first (412 precondition failed, 409 exists, 400 "already exists"/"missing"), the
   table is re-read and the batch re-planned (a column it added with another type now
   rejects our activity as a type conflict).
4. **Data**: each insert run is one Storage Write `AppendRows` call on the table's
   `_default` stream (Arrow rows, split below 9 MB per request); each run of deletes is
   one parameterized `DELETE ... WHERE (c1 = @p0 AND c2 IS NULL) OR (...)` DML job.
   Storage Write rows can be deleted by DML right away (legacy `insertAll` rows cannot
   while they sit in the streaming buffer, about 30 minutes: `insert_all` mode is a
   fallback for projects without the Storage Write API).
5. **Markers**: one append of `(dedup_id, table_name, applied_at)` rows to
   `_ingest_applied` (partitioned by day on `applied_at`, 14-day expiration, clustered
   by `table_name`; the dedup check only reads those 14 days).

Steady state that is 3 API calls per apply (dedup query, one append, one marker append)
plus one DML job per run of deletes, whatever the number of activities.

**Delivery guarantee: effectively exactly once per dedup_id**, built from at-least-once
parts (Pub/Sub redelivers; the default stream is at-least-once; BigQuery has no
transaction spanning Storage Write appends, DML and the marker). Every data row carries
a hidden column `_ingest_dedup_id` (the envelope it came from; not reported by
`table_schema`). If an apply fails after a step committed (a transient error between
two steps, an append whose answer was lost, a crash before the marker), the envelope
has no marker, so it is applied again, and before that its leftover rows are removed
with `DELETE ... WHERE _ingest_dedup_id IN UNNEST(@ids)`. Re-running its deletes is
harmless (they match only rows that are already gone or that this very retry inserted
again), so the table ends as if the envelope had applied once. That clean-up runs only
when the envelope may be dirty: its id is in this process's "unsure" set (an apply of it
raised after writing started) or `delivery_attempt > 1` (a redelivery, e.g. after a
crash). The one remaining window: a crash after rows committed but before the marker,
followed by a redelivery that reports `delivery_attempt == 1` (a broker that does not
count attempts) gives duplicate rows; set `always_clean=True` to close it at the price
of one DML job per apply. Per-table ordering (ordering key = table) keeps the retry of
an envelope ahead of the table's later envelopes. Writers of one table in *different*
processes are not serialized by the in-process lock; ordering keys keep a table on one
subscriber stream in practice.

Errors: network errors, 5xx, 429, `rateLimitExceeded`/`quotaExceeded`, gRPC
UNAVAILABLE/RESOURCE_EXHAUSTED/ABORTED/INTERNAL/DEADLINE_EXCEEDED ->
`TransientWarehouseError`; anything else -> `TerminalWarehouseError`. With BigQuery
"nothing was committed" is not literally true after step 4 started; the markers and the
clean-up above make the retry safe instead.

Type map (`app.schema.types.TYPES[...].bigquery_type`): record -> JSON (a JSON object,
queryable with JSON functions; STRUCT would need a fixed schema per record). Every
column's description says `activity type: <name>`, so `table_schema` maps back exactly.

Emulator (`settings.bigquery_emulator_host`, bqemulator 1.4.0) differences, emulator
only: a schema PATCH changes just its catalog, so new columns are also added with one
`ALTER TABLE ... ADD COLUMN IF NOT EXISTS` per column (it allows one per statement);
BIGNUMERIC cannot be created there (DuckDB DECIMAL stops at 38 digits), so bignumeric
columns are STRING holding the canonical decimal text (exact, like the DuckDB backend).
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Sequence

import orjson

from app.schema.activity import Activity
from app.schema.types import TYPES
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
)

log = logging.getLogger(__name__)

DEDUP_COLUMN = "_ingest_dedup_id"
APPLIED_TABLE = "_ingest_applied"
RESERVED_PREFIX = "_ingest_"
APPLIED_RETENTION_DAYS = 14
TYPE_DESCRIPTION_PREFIX = "activity type: "
MAX_APPEND_BYTES = 9 * 1024 * 1024  # AppendRows requests must stay below 10 MB (emulator) / 20 MB
MAX_INSERT_ALL_BYTES = 8 * 1024 * 1024
MAX_INSERT_ALL_ROWS = 10_000
MAX_DELETES_PER_STATEMENT = 1000
MAX_PARAMS_PER_STATEMENT = 8000
SCHEMA_RETRIES = 6
APPLIED_CACHE_SIZE = 100_000

_TABLE_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_FORBIDDEN_COLUMN_PREFIXES = ("_table_", "_file_", "_partition", "_row_timestamp", "__root__", "_colidentifier")
_REVERSE_TYPES = {
    "STRING": "string",
    "BYTES": "bytes",
    "INTEGER": "integer",
    "INT64": "integer",
    "FLOAT": "float",
    "FLOAT64": "float",
    "NUMERIC": "numeric",
    "BIGNUMERIC": "bignumeric",
    "BOOLEAN": "boolean",
    "BOOL": "boolean",
    "TIMESTAMP": "timestamp",
    "DATE": "date",
    "TIME": "time",
    "DATETIME": "datetime",
    "GEOGRAPHY": "geography",
    "JSON": "record",
}
_RESERVED_TYPE = "__ingest_reserved__"  # a type no activity can have: conflicts with anything

# Process-wide per-table locks: two warehouse instances in one process (tests, a
# subscriber with several pull threads) never write one table at the same time.
_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _table_lock(key: tuple[str, str, str]) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


# --------------------------------------------------------------------------- clients


def make_bigquery_client(settings: Settings):
    """A `google.cloud.bigquery.Client` for `settings`.

    With `bigquery_emulator_host` set: anonymous credentials and the emulator's REST
    endpoint; otherwise Application Default Credentials.
    """
    from google.cloud import bigquery

    if settings.bigquery_emulator_host:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(
            project=settings.gcp_project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=f"http://{settings.bigquery_emulator_host}"),
        )
    return bigquery.Client(project=settings.gcp_project)


def ensure_dataset(settings: Settings, client: Any = None) -> bool:
    """Create `settings.bigquery_dataset` if it is missing (idempotent); True if it was created."""
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    own = client is None
    client = client or make_bigquery_client(settings)
    name = f"{settings.gcp_project}.{settings.bigquery_dataset}"
    try:
        try:
            client.get_dataset(name)
            return False
        except gexc.NotFound:
            client.create_dataset(bigquery.Dataset(name), exists_ok=True, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            return True
    finally:
        if own:
            client.close()


def make_write_client(settings: Settings, credentials: Any = None):
    """A Storage Write API client: insecure gRPC to the emulator, or the real endpoint."""
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient

    if settings.bigquery_emulator_grpc_host:
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

        channel = grpc.insecure_channel(
            settings.bigquery_emulator_grpc_host,
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))
    return BigQueryWriteClient(credentials=credentials)


# --------------------------------------------------------------------------- errors

_TRANSIENT_REASONS = ("ratelimitexceeded", "quotaexceeded", "backenderror", "internalerror", "jobratelimitexceeded")


# The client library's default retry keeps going for up to 10 minutes; bound it so an
# outage surfaces as TransientWarehouseError and the subscriber's own capped backoff
# (and /readyz) take over.
CALL_TIMEOUT_SECONDS = 30.0
RETRY_DEADLINE_SECONDS = 10.0
JOB_TIMEOUT_SECONDS = 120.0


def _bounded_retry():
    from google.cloud.bigquery.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_SECONDS)


def _is_transient(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    try:
        import requests

        network = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover
        network = ()
    try:
        from google.auth.exceptions import TransportError
    except ImportError:  # pragma: no cover
        TransportError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, (TransientWarehouseError, ConnectionError, TimeoutError)) or isinstance(exc, network):
        return True
    if TransportError and isinstance(exc, TransportError):
        return True
    if isinstance(exc, gexc.RetryError):
        return True
    if isinstance(
        exc,
        (
            gexc.TooManyRequests,
            gexc.InternalServerError,
            gexc.BadGateway,
            gexc.ServiceUnavailable,
            gexc.GatewayTimeout,
            gexc.DeadlineExceeded,
            gexc.Aborted,
            gexc.ResourceExhausted,
        ),
    ):
        return True
    if isinstance(exc, gexc.GoogleAPICallError):
        text = str(exc).lower()
        if exc.code is not None and isinstance(exc.code, int) and exc.code >= 500:
            return True
        if any(r in text for r in _TRANSIENT_REASONS):
            return True
    try:
        import grpc

        if isinstance(exc, grpc.RpcError) and exc.code() in _TRANSIENT_GRPC:  # type: ignore[attr-defined]
            return True
    except Exception:  # pragma: no cover
        pass
    return False


def _grpc_transient_codes() -> set:
    import grpc

    return {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }


try:
    _TRANSIENT_GRPC = _grpc_transient_codes()
except Exception:  # pragma: no cover
    _TRANSIENT_GRPC = set()

# google.rpc.Code numbers of AppendRowsResponse.error that are worth retrying
_TRANSIENT_RPC_CODES = {1, 2, 4, 8, 10, 13, 14}


def _wrap(exc: BaseException, what: str) -> Exception:
    if isinstance(exc, (TransientWarehouseError, TerminalWarehouseError)):
        return exc
    if _is_transient(exc):
        return TransientWarehouseError(f"BigQuery {what}: {exc}")
    return TerminalWarehouseError(f"BigQuery {what}: {exc}")


def _is_not_found(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # a wrapped error may be its own cause
        if isinstance(exc, gexc.NotFound) or "404 Not found" in str(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def _is_schema_conflict(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    if isinstance(exc, (gexc.PreconditionFailed, gexc.Conflict)):
        return True
    if isinstance(exc, gexc.BadRequest):
        text = str(exc).lower()
        return any(s in text for s in ("already exists", "is missing in new schema", "does not match", "duplicate"))
    return False


# --------------------------------------------------------------------------- value conversion


def _quote(name: str) -> str:
    if not (_TABLE_RE.match(name) or _COLUMN_RE.match(name)):
        raise ValueError(f"invalid identifier {name!r}")
    return f"`{name}`"


def _float(v: Any) -> float:
    return float(v)  # "NaN" / "Infinity" / "-Infinity" parse too


def _timestamp(v: str) -> dt.datetime:
    return dt.datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone(dt.timezone.utc)


def _b64(v: str) -> bytes:
    return base64.b64decode(v, validate=True)


def _json_text(v: Any) -> str:
    return orjson.dumps(v).decode()


@dataclass(frozen=True, slots=True)
class _TableRef:
    project: str
    dataset: str
    table: str

    @property
    def sql(self) -> str:
        return f"`{self.project}.{self.dataset}.{self.table}`"

    @property
    def api(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def default_stream(self) -> str:
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}/streams/_default"


@dataclass(slots=True)
class _TableState:
    schema: planner.Schema  # user columns: lower name -> (name, activity type)
    bq_types: dict[str, str]  # column name -> BigQuery type as stored (incl. hidden)
    etag: str | None
    has_dedup_column: bool


class BigQueryWarehouse(Warehouse):
    def __init__(self, settings: Settings, *, client: Any = None, always_clean: bool = False) -> None:
        self.settings = settings
        self.project = settings.gcp_project
        self.dataset = settings.bigquery_dataset
        if not _TABLE_RE.match(self.dataset) or not re.match(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$|^[A-Za-z0-9:._-]+$", self.project):
            raise ValueError(f"invalid BigQuery project/dataset {self.project!r}/{self.dataset!r}")
        self.emulator = bool(settings.bigquery_emulator_host)
        self.insert_mode = settings.bigquery_insert_mode
        self.always_clean = always_clean
        self.capabilities = Capabilities(
            name="bigquery",
            transactional=False,
            max_alters_per_statement=1 if self.emulator else None,
            supports_geometry=True,
        )
        self.api_calls: collections.Counter[str] = collections.Counter()
        self._client = client or make_bigquery_client(settings)
        self._write_client: Any = None
        self._write_client_lock = threading.Lock()
        self._tables: dict[str, _TableState] = {}
        self._applied_cache: OrderedDict[str, None] = OrderedDict()
        self._unsure: set[str] = set()
        self._state_lock = threading.Lock()
        self._meta_ready = False

    # ----------------------------------------------------------------- helpers

    def _ref(self, table: str) -> _TableRef:
        if not _TABLE_RE.match(table):
            raise TerminalWarehouseError(f"invalid BigQuery table name {table!r}")
        return _TableRef(self.project, self.dataset, table)

    def _bq_type(self, typ: str) -> str:
        if typ == "bignumeric" and self.emulator:
            return "STRING"  # emulator only: no BIGNUMERIC there (see module docstring)
        return TYPES[typ].bigquery_type

    def _field(self, name: str, typ: str):
        from google.cloud import bigquery

        return bigquery.SchemaField(
            name, self._bq_type(typ), mode="NULLABLE", description=TYPE_DESCRIPTION_PREFIX + typ
        )

    def _dedup_field(self):
        from google.cloud import bigquery

        return bigquery.SchemaField(
            DEDUP_COLUMN, "STRING", mode="NULLABLE", description="ingest: dedup_id of the message that wrote the row"
        )

    def _writer(self):
        with self._write_client_lock:
            if self._write_client is None:
                self._write_client = make_write_client(self.settings, credentials=getattr(self._client, "_credentials", None))
            return self._write_client

    def _job_config(self, params: list | None = None, **kw: Any):
        from google.cloud import bigquery

        return bigquery.QueryJobConfig(
            query_parameters=params or [], default_dataset=f"{self.project}.{self.dataset}", use_legacy_sql=False, **kw
        )

    def _run_query(self, sql: str, params: list | None, kind: str):
        self.api_calls[kind] += 1
        job = self._client.query(sql, job_config=self._job_config(params), retry=_bounded_retry(), job_retry=None, timeout=CALL_TIMEOUT_SECONDS)
        return job, job.result(retry=_bounded_retry(), job_retry=None, timeout=JOB_TIMEOUT_SECONDS)

    # ----------------------------------------------------------------- metadata table

    def _ensure_meta(self) -> None:
        if self._meta_ready:
            return
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        ref = self._ref(APPLIED_TABLE)
        try:
            self.api_calls["other"] += 1
            self._client.get_table(ref.api, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
        except gexc.NotFound:
            self.api_calls["other"] += 1
            try:
                self._client.create_dataset(bigquery.Dataset(f"{self.project}.{self.dataset}"), exists_ok=True, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            except gexc.GoogleAPICallError as exc:
                raise _wrap(exc, "create dataset") from exc
            t = bigquery.Table(
                ref.api,
                schema=[
                    bigquery.SchemaField("dedup_id", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("applied_at", "TIMESTAMP", mode="REQUIRED"),
                ],
            )
            t.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY,
                field="applied_at",
                expiration_ms=APPLIED_RETENTION_DAYS * 86_400_000,
            )
            t.clustering_fields = ["table_name"]
            t.description = "ingest pipeline: dedup_ids already applied (one row per applied message chunk)"
            self.api_calls["metadata_update"] += 1
            try:
                self._client.create_table(t, exists_ok=True, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            except gexc.GoogleAPICallError as exc:
                raise _wrap(exc, f"create {APPLIED_TABLE}") from exc
        except Exception as exc:
            raise _wrap(exc, f"get {APPLIED_TABLE}") from exc
        self._meta_ready = True

    def _applied_ids(self, table: str, ids: list[str]) -> set[str]:
        from google.cloud import bigquery

        with self._state_lock:
            known = {i for i in ids if i in self._applied_cache}
        if len(known) == len(ids):
            return known
        self._ensure_meta()
        sql = (
            f"SELECT DISTINCT dedup_id FROM {self._ref(APPLIED_TABLE).sql} "
            "WHERE dedup_id IN UNNEST(@ids) AND table_name = @table "
            f"AND applied_at >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {APPLIED_RETENTION_DAYS * 24} HOUR)"
        )
        params = [bigquery.ArrayQueryParameter("ids", "STRING", ids), bigquery.ScalarQueryParameter("table", "STRING", table)]
        try:
            _, rows = self._run_query(sql, params, "query")
            found = {row[0] for row in rows}
        except Exception as exc:
            raise _wrap(exc, "dedup check") from exc
        self._remember_applied(found)
        return found | known

    def _remember_applied(self, ids: Iterable[str]) -> None:
        with self._state_lock:
            for i in ids:
                self._applied_cache[i] = None
                self._applied_cache.move_to_end(i)
            while len(self._applied_cache) > APPLIED_CACHE_SIZE:
                self._applied_cache.popitem(last=False)

    # ----------------------------------------------------------------- schema

    def _fetch_state(self, table: str) -> _TableState | None:
        from google.api_core import exceptions as gexc

        self.api_calls["other"] += 1
        try:
            t = self._client.get_table(self._ref(table).api, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
        except gexc.NotFound:
            self._tables.pop(table, None)
            return None
        except Exception as exc:
            raise _wrap(exc, f"get table {table}") from exc
        state = self._state_from_table(t)
        self._tables[table] = state
        return state

    def _state_from_table(self, t: Any) -> _TableState:
        schema: planner.Schema = {}
        bq_types: dict[str, str] = {}
        has_dedup = False
        for f in t.schema:
            bq_types[f.name] = f.field_type
            if f.name.lower() == DEDUP_COLUMN:
                has_dedup = True
                continue
            schema[f.name.lower()] = (f.name, self._activity_type(f))
        return _TableState(schema=schema, bq_types=bq_types, etag=t.etag, has_dedup_column=has_dedup)

    @staticmethod
    def _activity_type(f: Any) -> str:
        desc = f.description or ""
        if desc.startswith(TYPE_DESCRIPTION_PREFIX):
            typ = desc[len(TYPE_DESCRIPTION_PREFIX):].strip()
            if typ in TYPES:
                return typ
        if f.mode == "REPEATED" or f.field_type in ("RECORD", "STRUCT"):
            return "record"
        return _REVERSE_TYPES.get(f.field_type.upper(), "string")

    def _state(self, table: str) -> _TableState | None:
        state = self._tables.get(table)
        if state is None:
            state = self._fetch_state(table)  # not cached when missing: another process may create it
        return state

    def _apply_schema(self, table: str, state: _TableState | None, new_cols: list[planner.Column], create: bool) -> _TableState:
        """Create the table / add the columns. Raises `_SchemaRaced` when another writer got there first."""
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        ref = self._ref(table)
        fields = [self._field(name, typ) for name, typ in new_cols]
        if create:
            t = bigquery.Table(ref.api, schema=[*fields, self._dedup_field()])
            t.description = "ingest pipeline table; column descriptions carry the activity types"
            self.api_calls["metadata_update"] += 1
            try:
                created = self._client.create_table(t, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            except gexc.Conflict as exc:
                raise _SchemaRaced(str(exc)) from exc
            except Exception as exc:
                raise _wrap(exc, f"create table {table}") from exc
            new_state = self._state_from_table(created)
            self._tables[table] = new_state
            return new_state
        assert state is not None
        if not state.has_dedup_column:
            fields.append(self._dedup_field())
        if not fields:
            return state
        if state.etag is None or self.emulator:
            # emulator only (or no etag known): it does not check etags, so read first
            self.api_calls["other"] += 1
            try:
                t = self._client.get_table(ref.api, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            except Exception as exc:
                raise _wrap(exc, f"get table {table}") from exc
            fresh = self._state_from_table(t)
            if set(fresh.bq_types) != set(state.bq_types):
                self._tables[table] = fresh
                raise _SchemaRaced("table changed since it was cached")
        else:
            t = self._table_from_state(ref, state)  # the cached schema, sent with its etag
        existing = {f.name.lower() for f in t.schema}
        to_add = [f for f in fields if f.name.lower() not in existing]
        if not to_add:
            raise _SchemaRaced("columns already there")
        t.schema = [*t.schema, *to_add]
        if self.emulator:
            # emulator only: PATCH changes its catalog, DDL its storage (one ALTER each).
            for f in to_add:
                self.api_calls["emulator_ddl"] += 1
                sql = f"ALTER TABLE {ref.sql} ADD COLUMN IF NOT EXISTS {_quote(f.name)} {f.field_type}"
                try:
                    self._client.query(
                        sql, job_config=self._job_config(), retry=_bounded_retry(), job_retry=None, timeout=CALL_TIMEOUT_SECONDS
                    ).result(
                        retry=_bounded_retry(), job_retry=None, timeout=JOB_TIMEOUT_SECONDS
                    )
                except Exception as exc:
                    raise _wrap(exc, f"add column {f.name}") from exc
        self.api_calls["metadata_update"] += 1
        try:
            updated = self._client.update_table(t, ["schema"], retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
        except Exception as exc:
            if _is_schema_conflict(exc):
                raise _SchemaRaced(str(exc)) from exc
            raise _wrap(exc, f"add columns to {table}") from exc
        new_state = self._state_from_table(updated)
        missing = [f.name for f in to_add if f.name.lower() not in {k.lower() for k in new_state.bq_types}]
        if missing:  # a concurrent patch replaced ours (emulator: no etag check)
            raise _SchemaRaced(f"columns {missing} missing after patch")
        self._tables[table] = new_state
        return new_state

    def _table_from_state(self, ref: _TableRef, state: _TableState):
        from google.cloud import bigquery

        t = bigquery.Table(ref.api)
        fields = []
        for name, bq in state.bq_types.items():
            low = name.lower()
            if low == DEDUP_COLUMN:
                fields.append(self._dedup_field())
            else:
                typ = state.schema[low][1]
                fields.append(bigquery.SchemaField(name, bq, mode="NULLABLE", description=TYPE_DESCRIPTION_PREFIX + typ))
        t.schema = fields
        t._properties["etag"] = state.etag
        return t

    # ----------------------------------------------------------------- planning

    def _plan(self, table: str, state: _TableState | None, envelopes: list[Envelope]) -> planner.Plan:
        """The shared planner, plus BigQuery's own column-name rules as rejections."""
        swapped: dict[tuple[str, int], tuple[Activity, str]] = {}
        planned: list[Envelope] = []
        for env in envelopes:
            acts = env.activities
            new_acts = None
            for i, act in enumerate(acts):
                reason = _bad_columns(act)
                if reason is not None:
                    if new_acts is None:
                        new_acts = list(acts)
                    # the planner rejects an unknown operation; the reason is replaced below
                    new_acts[i] = Activity("__rejected__", act.table, [], [], [])  # type: ignore[arg-type]
                    swapped[(env.dedup_id, i)] = (act, reason)
            planned.append(env if new_acts is None else Envelope(env.dedup_id, env.table, new_acts, env.delivery_attempt))
        schema = dict(state.schema) if state is not None else None
        plan = planner.plan_table(table, schema, planned)
        # A few deletes among many inserts: one write and one DML instead of one each per delete.
        plan.steps = planner.coalesce_steps(plan.steps)
        if swapped:
            plan.rejections = [
                Rejection(r.dedup_id, r.index, *swapped[(r.dedup_id, r.index)]) if (r.dedup_id, r.index) in swapped else r
                for r in plan.rejections
            ]
        return plan

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
                return self._apply_locked(ref, list(envelopes), result)
            except Exception as exc:
                if _is_not_found(exc):
                    # The dataset, a table or the marker table vanished under the cache
                    # (dropped by hand, a fresh emulator): forget what we knew and retry,
                    # the next attempt creates what is missing.
                    self._forget_cached_state()
                    raise TransientWarehouseError(f"BigQuery {table}: something cached is gone, retrying: {exc}") from exc
                raise

    def _forget_cached_state(self) -> None:
        with self._state_lock:
            self._tables.clear()
            self._meta_ready = False

    def _apply_locked(self, ref: _TableRef, envelopes: list[Envelope], result: ApplyResult) -> ApplyResult:
        table = ref.table
        unique: dict[str, Envelope] = {}
        for env in envelopes:
            if env.dedup_id in unique:
                result.skipped_duplicates += 1
            else:
                unique[env.dedup_id] = env
        applied = self._applied_ids(table, list(unique))
        todo = [e for e in unique.values() if e.dedup_id not in applied]
        result.skipped_duplicates += len(unique) - len(todo)
        if not todo:
            return result

        # plan + schema, re-planned when another writer changed the table under us
        state = self._state(table)
        for attempt in range(SCHEMA_RETRIES):
            plan = self._plan(table, state, todo)
            new_cols: list[planner.Column] = []
            create = False
            for step in plan.steps:
                if isinstance(step, planner.CreateTable):
                    create = True
                    new_cols.extend(step.columns)
                elif isinstance(step, planner.AddColumns):
                    new_cols.extend(step.columns)
            # convert every value before anything is written
            try:
                writes = self._prepare(ref, plan, todo)
            except (ValueError, TypeError, ArithmeticError, OverflowError) as exc:
                raise TerminalWarehouseError(f"value BigQuery cannot take in {table}: {exc}") from exc
            if not new_cols and (state is None or state.has_dedup_column):
                break
            try:
                state = self._apply_schema(table, state, new_cols, create)
                break
            except _SchemaRaced as raced:
                log.info("schema of %s changed concurrently (%s); re-reading", table, raced)
                state = self._fetch_state(table)
        else:
            raise TransientWarehouseError(f"schema of {table} kept changing under us")

        ids = [e.dedup_id for e in todo]
        with self._state_lock:
            dirty = [e.dedup_id for e in todo if self.always_clean or e.dedup_id in self._unsure or e.delivery_attempt > 1]
            self._unsure.update(ids)
        try:
            if dirty and not create:
                self._clean(ref, dirty)
            for kind, payload, count in writes:
                if kind == "insert":
                    self._append(ref, payload, count)
                    result.rows_inserted += count
                elif kind == "insert_all":
                    self._insert_all(ref, payload)
                    result.rows_inserted += count
                else:
                    for sql, params in payload:
                        result.rows_deleted += self._dml(sql, params)
            self._write_markers(table, ids)
        except Exception as exc:
            raise _wrap(exc, f"apply to {table}") from exc
        with self._state_lock:
            self._unsure.difference_update(ids)
        self._remember_applied(ids)
        result.applied_envelopes += len(todo)
        result.noop_deletes += plan.noop_deletes
        result.schema_changes += plan.schema_changes
        result.rejections.extend(plan.rejections)
        return result

    def _prepare(self, ref: _TableRef, plan: planner.Plan, todo: list[Envelope]) -> list[tuple[str, Any, int]]:
        """Turn the plan's data steps into ready-to-send payloads (no I/O)."""
        rejected = {(r.dedup_id, r.index) for r in plan.rejections}
        # the source (dedup_id, index) of every insert that survived planning, in order
        sources = [
            (env.dedup_id, i)
            for env in todo
            for i, act in enumerate(env.activities)
            if act.operation == "insert" and (env.dedup_id, i) not in rejected
        ]
        writes: list[tuple[str, Any, int]] = []
        pos = 0
        for step in plan.steps:
            if isinstance(step, planner.InsertRows):
                src = sources[pos : pos + step.count]
                pos += step.count
                if len(src) != step.count:  # pragma: no cover - planner invariant
                    raise TerminalWarehouseError("internal: insert rows do not line up with their activities")
                if self.insert_mode == "insert_all":
                    writes.append(("insert_all", self._json_rows(step, src), step.count))
                else:
                    writes.append(("insert", self._arrow_batches(step, [s[0] for s in src]), step.count))
            elif isinstance(step, planner.DeleteRows):
                writes.append(("delete", self._delete_statements(ref, step), len(step.conditions)))
        return writes

    # ----------------------------------------------------------------- inserts

    def _arrow_type(self, typ: str):
        import pyarrow as pa

        return {
            "string": pa.string(),
            "bytes": pa.binary(),
            "integer": pa.int64(),
            "float": pa.float64(),
            "numeric": pa.decimal128(38, 9),
            "bignumeric": pa.string() if self.emulator else pa.decimal256(76, 38),
            "boolean": pa.bool_(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "date": pa.date32(),
            "time": pa.time64("us"),
            "datetime": pa.timestamp("us"),
            "geography": pa.string(),  # WKT
            "record": pa.string(),  # JSON text
        }[typ]

    def _arrow_values(self, typ: str, values: list[Any]) -> list[Any]:
        conv = {
            "bytes": _b64,
            "float": _float,
            "numeric": Decimal,
            "bignumeric": (lambda v: v) if self.emulator else Decimal,
            "timestamp": _timestamp,
            "date": dt.date.fromisoformat,
            "time": dt.time.fromisoformat,
            "datetime": dt.datetime.fromisoformat,
            "record": _json_text,
        }.get(typ)
        if conv is None:
            return values
        return [None if v is None else conv(v) for v in values]

    def _arrow_batches(self, step: planner.InsertRows, dedup_ids: list[str]) -> list[tuple[bytes, bytes, int]]:
        """Arrow IPC (schema, record batch, rows) pieces, each below MAX_APPEND_BYTES."""
        import pyarrow as pa

        fields = []
        arrays = []
        for name, typ in step.columns:
            atype = self._arrow_type(typ)
            fields.append(pa.field(name, atype))
            arrays.append(pa.array(self._arrow_values(typ, step.values[name]), type=atype))
        fields.append(pa.field(DEDUP_COLUMN, pa.string()))
        arrays.append(pa.array(dedup_ids, type=pa.string()))
        schema = pa.schema(fields)
        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
        schema_bytes = schema.serialize().to_pybytes()
        out: list[tuple[bytes, bytes, int]] = []
        stack = [batch]
        while stack:
            b = stack.pop(0)
            data = b.serialize().to_pybytes()
            if len(data) > MAX_APPEND_BYTES and b.num_rows > 1:
                half = b.num_rows // 2
                stack[0:0] = [b.slice(0, half), b.slice(half)]
                continue
            out.append((schema_bytes, data, b.num_rows))
        return out

    def _append(self, ref: _TableRef, pieces: list[tuple[bytes, bytes, int]], count: int = 0) -> None:
        """One AppendRows stream on the default stream, one request per piece."""
        from google.cloud.bigquery_storage_v1 import types

        stream = ref.default_stream
        requests = [
            types.AppendRowsRequest(
                write_stream=stream,
                arrow_rows=types.AppendRowsRequest.ArrowData(
                    writer_schema=types.ArrowSchema(serialized_schema=schema_bytes),
                    rows=types.ArrowRecordBatch(serialized_record_batch=data),
                ),
            )
            for schema_bytes, data, _ in pieces
        ]
        if not requests:
            return
        self.api_calls["write"] += len(requests)
        client = self._writer()
        answered = 0
        try:
            responses = client.append_rows(
                iter(requests), timeout=120, metadata=(("x-goog-request-params", f"write_stream={stream}"),)
            )
            for resp in responses:
                answered += 1
                if resp.row_errors:
                    msgs = "; ".join(f"row {e.index}: {e.message}" for e in list(resp.row_errors)[:5])
                    raise TerminalWarehouseError(f"AppendRows to {ref.table} refused rows: {msgs}")
                if resp.error and resp.error.code:
                    msg = f"AppendRows to {ref.table} failed ({resp.error.code}): {resp.error.message}"
                    if resp.error.code in _TRANSIENT_RPC_CODES or "schema" in resp.error.message.lower():
                        # a schema mismatch right after adding columns: the stream has not seen them yet
                        self._tables.pop(ref.table, None)
                        raise TransientWarehouseError(msg)
                    raise TerminalWarehouseError(msg)
                if answered == len(requests):
                    break
        except (TransientWarehouseError, TerminalWarehouseError):
            raise
        except Exception as exc:
            raise _wrap(exc, f"AppendRows to {ref.table}") from exc
        if answered != len(requests):
            raise TransientWarehouseError(f"AppendRows to {ref.table}: {answered} of {len(requests)} answered")

    def _json_value(self, typ: str, v: Any) -> Any:
        if v is None:
            return None
        if typ == "record":
            return _json_text(v)
        if typ == "float" and isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return v  # canonical forms are what insertAll expects (base64 bytes, decimal text, ...)

    def _json_rows(self, step: planner.InsertRows, src: list[tuple[str, int]]) -> list[tuple[list[dict], list[str]]]:
        cols = [(name, typ, step.values[name]) for name, typ in step.columns]
        rows: list[dict] = []
        for r, (dedup_id, _) in enumerate(src):
            row = {name: self._json_value(typ, vals[r]) for name, typ, vals in cols if vals[r] is not None}
            row[DEDUP_COLUMN] = dedup_id
            rows.append(row)
        row_ids = [f"{dedup_id}:{index}" for dedup_id, index in src]
        chunks: list[tuple[list[dict], list[str]]] = []
        cur: list[dict] = []
        cur_ids: list[str] = []
        size = 0
        for row, rid in zip(rows, row_ids):
            n = len(orjson.dumps(row)) + len(rid) + 16
            if cur and (size + n > MAX_INSERT_ALL_BYTES or len(cur) >= MAX_INSERT_ALL_ROWS):
                chunks.append((cur, cur_ids))
                cur, cur_ids, size = [], [], 0
            cur.append(row)
            cur_ids.append(rid)
            size += n
        if cur:
            chunks.append((cur, cur_ids))
        return chunks

    def _insert_all(self, ref: _TableRef, chunks: list[tuple[list[dict], list[str]]]) -> None:
        for rows, row_ids in chunks:
            self.api_calls["write"] += 1
            try:
                errors = self._client.insert_rows_json(ref.api, rows, row_ids=row_ids, retry=_bounded_retry(), timeout=CALL_TIMEOUT_SECONDS)
            except Exception as exc:
                raise _wrap(exc, f"insertAll to {ref.table}") from exc
            if errors:
                text = str(errors[:5])
                reasons = {e.get("reason") for item in errors for e in item.get("errors", [])}
                if reasons <= {"backendError", "internalError", "timeout", "stopped"}:
                    raise TransientWarehouseError(f"insertAll to {ref.table}: {text}")
                raise TerminalWarehouseError(f"insertAll to {ref.table} refused rows: {text}")

    # ----------------------------------------------------------------- deletes

    def _condition(self, col: str, typ: str, value: Any, pname: str, params: list) -> str:
        from google.cloud import bigquery

        q = _quote(col)
        if value is None:
            return f"{q} IS NULL"
        P = bigquery.ScalarQueryParameter
        if typ == "float":
            f = _float(value)
            if math.isnan(f):
                return f"IS_NAN({q})"
            params.append(P(pname, "FLOAT64", f))
            return f"{q} = @{pname}"
        if typ == "geography":
            params.append(P(pname, "STRING", value))
            return f"ST_EQUALS({q}, ST_GEOGFROMTEXT(@{pname}))"
        if typ == "record":
            params.append(P(pname, "STRING", _json_text(value)))
            return f"TO_JSON_STRING({q}) = TO_JSON_STRING(PARSE_JSON(@{pname}))"
        if typ == "bytes" and self.emulator:
            # emulator only: it mangles non-empty BYTES parameters; the base64 text (a
            # STRING parameter) decoded in SQL compares right there
            _b64(value)
            params.append(P(pname, "STRING", value))
            return f"{q} = FROM_BASE64(@{pname})"
        if typ == "bytes":
            params.append(P(pname, "BYTES", _b64(value)))
        elif typ == "integer":
            params.append(P(pname, "INT64", int(value)))
        elif typ == "numeric":
            params.append(P(pname, "NUMERIC", Decimal(value)))
        elif typ == "bignumeric":
            if self.emulator:
                params.append(P(pname, "STRING", value))  # emulator: canonical text column
            else:
                params.append(P(pname, "BIGNUMERIC", Decimal(value)))
        elif typ == "boolean":
            params.append(P(pname, "BOOL", bool(value)))
        elif typ == "timestamp":
            params.append(P(pname, "TIMESTAMP", _timestamp(value)))
        elif typ == "date":
            params.append(P(pname, "DATE", dt.date.fromisoformat(value)))
        elif typ == "time":
            params.append(P(pname, "TIME", dt.time.fromisoformat(value)))
        elif typ == "datetime":
            params.append(P(pname, "DATETIME", dt.datetime.fromisoformat(value)))
        else:
            params.append(P(pname, "STRING", value))
        return f"{q} = @{pname}"

    def _delete_statements(self, ref: _TableRef, step: planner.DeleteRows) -> list[tuple[str, list]]:
        """One DELETE per up to MAX_DELETES_PER_STATEMENT deletes (deletes commute)."""
        statements: list[tuple[str, list]] = []
        clauses: list[str] = []
        params: list = []
        for conds in step.conditions:
            parts = [self._condition(col, typ, value, f"p{len(params)}", params) for col, typ, value in conds]
            clauses.append("(" + " AND ".join(parts) + ")")
            if len(clauses) >= MAX_DELETES_PER_STATEMENT or len(params) >= MAX_PARAMS_PER_STATEMENT:
                statements.append((f"DELETE FROM {ref.sql} WHERE " + " OR ".join(clauses), params))
                clauses, params = [], []
        if clauses:
            statements.append((f"DELETE FROM {ref.sql} WHERE " + " OR ".join(clauses), params))
        return statements

    def _dml(self, sql: str, params: list) -> int:
        try:
            job, _ = self._run_query(sql, params, "dml")
        except Exception as exc:
            raise _wrap(exc, "DML") from exc
        return int(job.num_dml_affected_rows or 0)

    def _clean(self, ref: _TableRef, dedup_ids: list[str]) -> None:
        """Remove rows a failed earlier attempt of these envelopes may have left."""
        from google.cloud import bigquery

        sql = f"DELETE FROM {ref.sql} WHERE {DEDUP_COLUMN} IN UNNEST(@ids)"
        n = self._dml(sql, [bigquery.ArrayQueryParameter("ids", "STRING", dedup_ids)])
        if n:
            log.warning("removed %d rows left by an unfinished earlier apply of %s to %s", n, dedup_ids, ref.table)

    # ----------------------------------------------------------------- markers

    def _write_markers(self, table: str, ids: list[str]) -> None:
        ref = self._ref(APPLIED_TABLE)
        now = dt.datetime.now(dt.timezone.utc)
        if self.insert_mode == "insert_all":
            rows = [{"dedup_id": i, "table_name": table, "applied_at": now.isoformat()} for i in ids]
            self._insert_all(ref, [(rows, [f"{table}:{i}" for i in ids])])
            return
        import pyarrow as pa

        schema = pa.schema([("dedup_id", pa.string()), ("table_name", pa.string()), ("applied_at", pa.timestamp("us", tz="UTC"))])
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), pa.array([table] * len(ids), pa.string()), pa.array([now] * len(ids), schema.field(2).type)],
            schema=schema,
        )
        self._append(ref, [(schema.serialize().to_pybytes(), batch.serialize().to_pybytes(), len(ids))])

    # ----------------------------------------------------------------- reads

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        from google.api_core import exceptions as gexc

        qparams = [_positional_param(v) for v in (params or [])]
        try:
            _, rows = self._run_query(sql, qparams, "query")
            cols = [f.name for f in rows.schema]
            return QueryResult(cols, [tuple(r.values()) for r in rows], [f.field_type for f in rows.schema])
        except (gexc.BadRequest, gexc.NotFound, gexc.Forbidden) as exc:
            if _is_transient(exc):
                raise TransientWarehouseError(f"BigQuery query: {exc}") from exc
            raise WarehouseQueryError(str(exc)) from exc
        except Exception as exc:
            if _is_transient(exc):
                raise TransientWarehouseError(f"BigQuery query: {exc}") from exc
            raise WarehouseQueryError(str(exc)) from exc

    def table_schema(self, table: str) -> dict[str, str] | None:
        try:
            self._ref(table)
        except TerminalWarehouseError:
            return None
        state = self._fetch_state(table)
        if state is None:
            return None
        return {name: typ for name, typ in state.schema.values()}

    def ready(self) -> tuple[bool, str]:
        try:
            self.api_calls["other"] += 1
            self._client.get_dataset(f"{self.project}.{self.dataset}", timeout=5, retry=None)
            return True, "ok"
        except Exception as exc:
            return False, f"BigQuery dataset {self.project}.{self.dataset} not reachable: {exc}"

    def close(self) -> None:
        try:
            if self._write_client is not None:
                self._write_client.transport.close()
        except Exception:  # pragma: no cover
            pass
        self._write_client = None
        try:
            self._client.close()
        except Exception:  # pragma: no cover
            pass


class _SchemaRaced(Exception):
    """Another writer changed the table's schema first: re-read and re-plan."""


def _bad_columns(act: Activity) -> str | None:
    for name in act.col_names:
        if not isinstance(name, str) or not _COLUMN_RE.match(name):
            return f"column name {name!r} is not valid in BigQuery (letters, digits, underscore; not starting with a digit)"
        low = name.lower()
        if low.startswith(RESERVED_PREFIX):
            return f"column name {name!r} is reserved (prefix {RESERVED_PREFIX!r})"
        if low.startswith(_FORBIDDEN_COLUMN_PREFIXES):
            return f"column name {name!r} uses a prefix BigQuery reserves"
    return None


def _positional_param(v: Any):
    from google.cloud import bigquery

    P = bigquery.ScalarQueryParameter
    if v is None:
        return P(None, "STRING", None)
    if isinstance(v, bool):
        return P(None, "BOOL", v)
    if isinstance(v, int):
        return P(None, "INT64", v)
    if isinstance(v, float):
        return P(None, "FLOAT64", v)
    if isinstance(v, Decimal):
        return P(None, "NUMERIC", v)
    if isinstance(v, (bytes, bytearray)):
        return P(None, "BYTES", bytes(v))
    if isinstance(v, dt.datetime):
        return P(None, "TIMESTAMP" if v.tzinfo else "DATETIME", v)
    if isinstance(v, dt.date):
        return P(None, "DATE", v)
    if isinstance(v, dt.time):
        return P(None, "TIME", v)
    return P(None, "STRING", str(v))
