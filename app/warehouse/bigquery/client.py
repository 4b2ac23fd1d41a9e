"""The ONE wrapper around BigQuery's clients: every call of the warehouse goes through it.

It applies the timeouts and bounded retries (the libraries' own retry predicates, cut
short so an outage surfaces as `TransientWarehouseError` and the subscriber's capped
backoff and /readyz take over), counts calls per kind and bytes processed per kind (for
metrics and `make bench`), and translates every error in `errors.translate`.

Counters (both `collections.Counter`, keys = kind):
- `calls`: `query` (dedup lookups), `dml` (deletes, clean-ups), `write` (AppendRows
  requests / insertAll calls), `metadata_update` (create table, schema/clustering patch),
  `other` (table and dataset reads), `dry_run` (statement checks of read-only queries),
  `emulator_ddl` (emulator only).
- `bytes_processed`: `totalBytesProcessed` of each query/DML job, by the same kinds.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import tempfile
import threading
from typing import Any, Callable, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY, DEFAULT_RETRY
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

from app.settings import Settings
from app.warehouse.bigquery import errors

CALL_TIMEOUT_SECONDS = 30.0  # one HTTP request
RETRY_DEADLINE_SECONDS = 10.0  # all retries of one call (the library's default is 10 minutes)
JOB_TIMEOUT_SECONDS = 120.0  # waiting for one query job
PROBE_TIMEOUT_SECONDS = 5.0  # the readiness probe answers quickly or not at all
# Job retries re-run a job that failed with a retryable reason (a failed job committed
# nothing); the library gives job retries four times the call deadline, so do we.
RETRY = DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_SECONDS)
JOB_RETRY = DEFAULT_JOB_RETRY.with_timeout(4 * RETRY_DEADLINE_SECONDS)
EMULATOR_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")

class EmulatorCalls:
    """Emulator only: bqemulator runs every request on ONE DuckDB connection, from its REST
    event loop and its Storage Write threads alike, and concurrent requests mix up results
    or deadlock it. So every process on this machine that calls it (subscribers, the tests'
    own reads) sends one call at a time: a thread lock within the process, a file lock
    (`flock`) across processes. Re-entrant within a thread."""

    PATH = os.path.join(tempfile.gettempdir(), "bqemulator-calls.lock")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._file: Any = None

    def __enter__(self) -> "EmulatorCalls":
        self._lock.acquire()
        if self._depth == 0:
            try:
                self._file = open(self.PATH, "a+b")
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._close_file()
                self._lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._close_file()  # closing the file releases the flock
        self._lock.release()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


_EMULATOR_LOCK = EmulatorCalls()


def make_bigquery_client(settings: Settings) -> bigquery.Client:
    """A `google.cloud.bigquery.Client` for `settings` (location = `bigquery_location`).

    With `bigquery_emulator_host` set: anonymous credentials and the emulator's REST
    endpoint; otherwise Application Default Credentials.
    """
    if settings.bigquery_emulator_host:
        return bigquery.Client(
            project=settings.gcp_project,
            location=settings.bigquery_location,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=f"http://{settings.bigquery_emulator_host}"),
        )
    return bigquery.Client(project=settings.gcp_project, location=settings.bigquery_location)


def make_write_client(settings: Settings, credentials: Any = None) -> BigQueryWriteClient:
    """A Storage Write API client: insecure gRPC to the emulator, or the real endpoint."""
    if settings.bigquery_emulator_grpc_host:
        channel = grpc.insecure_channel(
            settings.bigquery_emulator_grpc_host,
            options=[
                ("grpc.max_send_message_length", EMULATOR_GRPC_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", EMULATOR_GRPC_MESSAGE_BYTES),
            ],
        )
        return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))
    return BigQueryWriteClient(credentials=credentials)


def ensure_dataset(settings: Settings, client: bigquery.Client | None = None) -> bool:
    """Create `settings.bigquery_dataset` in `settings.bigquery_location` if missing; True if created."""
    own = client is None
    wrapper = BigQueryClient(settings, rest=client)
    try:
        return wrapper.create_dataset()
    finally:
        if own:
            wrapper.close()


class BigQueryClient:
    """REST + Storage Write clients of one warehouse, with timeouts, retries and counters."""

    def __init__(self, settings: Settings, rest: bigquery.Client | None = None) -> None:
        self.settings = settings
        self.project = settings.gcp_project
        self.dataset = settings.bigquery_dataset
        self.location = settings.bigquery_location
        self.emulator = bool(settings.bigquery_emulator_host)
        self.rest = rest or make_bigquery_client(settings)
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes_processed: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()
        self._write_client: BigQueryWriteClient | None = None
        self._write_client_lock = threading.Lock()

    # ----------------------------------------------------------------- plumbing

    def count(self, kind: str, n: int = 1) -> None:
        with self._count_lock:
            self.calls[kind] += n

    def call(self, kind: str, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Count one call of `kind`, run it, translate whatever it raises."""
        self.count(kind)
        try:
            with self.one_at_a_time():
                return fn(*args, **kwargs)
        except Exception as exc:
            raise errors.translate(exc, what) from exc

    def one_at_a_time(self) -> contextlib.AbstractContextManager:
        """Emulator only: calls of this process serialized (see `_EMULATOR_LOCK`)."""
        return _EMULATOR_LOCK if self.emulator else contextlib.nullcontext()

    def rest_call(self, kind: str, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call` of a REST method with the bounded retry and the call timeout."""
        return self.call(kind, what, fn, *args, **{"retry": RETRY, "timeout": CALL_TIMEOUT_SECONDS, **kwargs})

    @staticmethod
    def _none_if_missing(read: Callable[[], T]) -> T | None:
        try:
            return read()
        except errors.TerminalWarehouseError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return None
            raise

    def write_client(self) -> BigQueryWriteClient:
        with self._write_client_lock:
            if self._write_client is None:
                self._write_client = make_write_client(
                    self.settings, credentials=getattr(self.rest, "_credentials", None)
                )
            return self._write_client

    @property
    def has_write_client(self) -> bool:
        return self._write_client is not None

    # ----------------------------------------------------------------- datasets and tables

    def get_dataset(self) -> bigquery.Dataset | None:
        """The dataset, or None when it does not exist (one try: this is the readiness probe)."""
        dataset_id = f"{self.project}.{self.dataset}"
        return self._none_if_missing(
            lambda: self.rest_call(
                "other",
                f"get dataset {self.dataset}",
                self.rest.get_dataset,
                dataset_id,
                retry=None,
                timeout=PROBE_TIMEOUT_SECONDS,
            )
        )

    def create_dataset(self) -> bool:
        """Create the dataset in `bigquery_location` if missing (idempotent); True if created."""
        if self.get_dataset() is not None:
            return False
        dataset = bigquery.Dataset(f"{self.project}.{self.dataset}")
        if self.location:
            dataset.location = self.location
        self.rest_call(
            "metadata_update", f"create dataset {self.dataset}", self.rest.create_dataset, dataset, exists_ok=True
        )
        return True

    def get_table(self, table_id: str) -> bigquery.Table | None:
        """The table, or None when it does not exist."""
        return self._none_if_missing(
            lambda: self.rest_call("other", f"get table {table_id}", self.rest.get_table, table_id)
        )

    def list_tables(self) -> list[str]:
        """The names of the dataset's tables (all pages)."""
        dataset_id = f"{self.project}.{self.dataset}"
        return self.rest_call(
            "other", f"list tables of {self.dataset}", lambda **kw: [t.table_id for t in self.rest.list_tables(dataset_id, **kw)]
        )

    def create_table(self, table: bigquery.Table, *, exists_ok: bool = False) -> bigquery.Table:
        what = f"create table {table.table_id}"
        return self.rest_call("metadata_update", what, self.rest.create_table, table, exists_ok=exists_ok)

    def update_table(self, table: bigquery.Table, fields: list[str]) -> bigquery.Table:
        """tables.patch of `fields`, conditional on the table's etag (412 if it changed)."""
        what = f"update {', '.join(fields)} of {table.table_id}"
        return self.rest_call("metadata_update", what, self.rest.update_table, table, fields)

    # ----------------------------------------------------------------- jobs and rows

    def query(self, sql: str, params: list | None, kind: str, what: str) -> Any:
        """Run one query / DML statement with `query_and_wait`; its RowIterator.

        Bytes processed are added to `bytes_processed[kind]`.
        """
        config = bigquery.QueryJobConfig(
            query_parameters=params or [], default_dataset=f"{self.project}.{self.dataset}", use_legacy_sql=False
        )
        if self.emulator:
            rows = self.call(kind, what, self._emulator_query, sql, config)
        else:
            rows = self.call(
                kind,
                what,
                self.rest.query_and_wait,
                sql,
                job_config=config,
                location=self.location,
                api_timeout=CALL_TIMEOUT_SECONDS,
                wait_timeout=JOB_TIMEOUT_SECONDS,
                retry=RETRY,
                job_retry=JOB_RETRY,
            )
        processed = getattr(rows, "total_bytes_processed", None)
        if processed:
            with self._count_lock:
                self.bytes_processed[kind] += int(processed)
        return rows

    def statement_type(self, sql: str, params: list | None, what: str) -> str:
        """What kind of statement `sql` is, from a dry run: validated, not run, not billed
        (https://cloud.google.com/bigquery/docs/running-queries#dry-run; `statementType`:
        https://cloud.google.com/bigquery/docs/reference/rest/v2/Job#JobStatistics2)."""
        config = bigquery.QueryJobConfig(
            dry_run=True, query_parameters=params or [], default_dataset=f"{self.project}.{self.dataset}",
            use_legacy_sql=False,
        )
        job = self.call("dry_run", what, self.rest.query, sql, job_config=config, location=self.location,
                        timeout=CALL_TIMEOUT_SECONDS)
        return job.statement_type or ""

    def _emulator_query(self, sql: str, config: bigquery.QueryJobConfig) -> Any:
        """Emulator only: its jobs.query answers 200 with the failure in `errors` (Google
        answers an HTTP error, which `query_and_wait` raises), so run a job and wait for it:
        a failed job's `errorResult` is raised."""
        job = self.rest.query(
            sql, job_config=config, location=self.location, retry=RETRY, job_retry=None, timeout=CALL_TIMEOUT_SECONDS
        )
        rows = job.result(retry=RETRY, job_retry=None, timeout=JOB_TIMEOUT_SECONDS)
        if rows.num_dml_affected_rows is None:  # its getQueryResults leaves the count out
            rows._num_dml_affected_rows = job.num_dml_affected_rows
        return rows

    def insert_rows_json(self, table_id: str, rows: list[dict], row_ids: list[str]) -> list[dict]:
        return self.rest_call(
            "write", f"insertAll to {table_id}", self.rest.insert_rows_json, table_id, rows, row_ids=row_ids
        )

    def close(self) -> None:
        with self._write_client_lock:
            write_client, self._write_client = self._write_client, None
        for close in (getattr(getattr(write_client, "transport", None), "close", None), self.rest.close):
            try:
                if close is not None:
                    close()
            except Exception:  # pragma: no cover - closing is best effort
                pass
