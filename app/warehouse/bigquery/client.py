"""The ONE wrapper around BigQuery's clients: every call of the warehouse goes through it.

It applies the timeouts and bounded retries (the libraries' own retry predicates, cut
short so an outage surfaces as `TransientWarehouseError` and the subscriber's capped
backoff and /readyz take over), counts calls per kind and bytes processed per kind (for
metrics and `make bench`), and translates every error in `errors.translate`.

Reads run with `query_and_wait` (jobs.query). DML runs as a job with a deterministic id
(`dml`), waited for with jobs.get; a DML job is never left behind: before a retry,
`settle_jobs` waits for (or cancels) every unfinished job of the table, so a job that
finishes late is seen, not raced.

Counters (both `collections.Counter`, keys = kind):
- `calls`: `query` (dedup lookups), `dml` (deletes, clean-ups), `write` (AppendRows
  requests / insertAll calls), `metadata_update` (create table, schema/clustering patch),
  `other` (table, dataset and job reads), `dry_run` (statement checks of read-only queries).
- `bytes_processed`: `totalBytesProcessed` of each query/DML job, by the same kinds.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Callable, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY, DEFAULT_RETRY, job_retry_reasons
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

from app.settings import Settings
from app.warehouse.base import TransientWarehouseError
from app.warehouse.bigquery import errors

CALL_TIMEOUT_SECONDS = 30.0  # one HTTP request
RETRY_DEADLINE_SECONDS = 10.0  # all retries of one call (the library's default is 10 minutes)
JOB_TIMEOUT_SECONDS = 120.0  # waiting for one query job
PROBE_TIMEOUT_SECONDS = 5.0  # the readiness probe answers quickly or not at all
LIST_PAGE_SIZE = 1000  # tables per tables.list page (maxResults; the server may send fewer)
# Reasons Google says to retry (https://cloud.google.com/bigquery/docs/error-messages#errortable)
RETRYABLE_REASONS = frozenset({"backendError", "internalError", "rateLimitExceeded", "badGateway"})


def _job_failed_retryably(exc: BaseException) -> bool:
    """A query job that failed with a reason worth a new job (`jobRateLimitExceeded`,
    `backendError`, ...: the library's job and call reasons). Not a transport error: RETRY
    has retried that within the call already, and retrying it again here would hold the
    subscriber inside one call for minutes instead of backing off on its own terms."""
    errors_ = getattr(exc, "errors", None)
    reason = errors_[0].get("reason") if errors_ and isinstance(errors_[0], dict) else None
    return reason in job_retry_reasons or reason in RETRYABLE_REASONS


# Job retries re-run a job that failed with a retryable reason (a failed job committed
# nothing); the library gives job retries four times the call deadline, so do we.
RETRY = DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_SECONDS)
JOB_RETRY = DEFAULT_JOB_RETRY.with_predicate(_job_failed_retryably).with_timeout(4 * RETRY_DEADLINE_SECONDS)
EMULATOR_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024

JOB_POLL_SECONDS = 0.5
T = TypeVar("T")


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
            return fn(*args, **kwargs)
        except Exception as exc:
            raise errors.translate(exc, what) from exc

    @staticmethod
    def one_at_a_time() -> contextlib.AbstractContextManager:
        """Calls are not serialized (the test stand-in's proxy does that itself); kept only
        until writer.py, reworked separately, stops calling it."""
        return contextlib.nullcontext()

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
        """The names of the dataset's tables (all pages, each one call)."""
        dataset_id = f"{self.project}.{self.dataset}"

        def names(**kw: Any) -> list[str]:
            return [t.table_id for t in self.rest.list_tables(dataset_id, page_size=LIST_PAGE_SIZE, **kw)]

        return self.rest_call("other", f"list tables of {self.dataset}", names)

    def create_table(self, table: bigquery.Table, *, exists_ok: bool = False) -> bigquery.Table:
        what = f"create table {table.table_id}"
        return self.rest_call("metadata_update", what, self.rest.create_table, table, exists_ok=exists_ok)

    def create_own_table(self, table: bigquery.Table) -> bigquery.Table:
        """Create one of the pipeline's own tables (ok if it exists), and the dataset first
        when that is what is missing."""
        try:
            return self.create_table(table, exists_ok=True)
        except errors.TerminalWarehouseError as exc:
            if not errors.is_not_found(exc):
                raise
        self.create_dataset()
        return self.create_table(table, exists_ok=True)

    def update_table(self, table: bigquery.Table, fields: list[str]) -> bigquery.Table:
        """tables.patch of `fields`, conditional on the table's etag (412 if it changed)."""
        what = f"update {', '.join(fields)} of {table.table_id}"
        return self.rest_call("metadata_update", what, self.rest.update_table, table, fields)

    # ----------------------------------------------------------------- jobs and rows

    def _config(self, params: list | None, **options: Any) -> bigquery.QueryJobConfig:
        return bigquery.QueryJobConfig(
            query_parameters=params or [], default_dataset=f"{self.project}.{self.dataset}", use_legacy_sql=False,
            **options,
        )  # fmt: skip

    def _count_bytes(self, kind: str, processed: Any) -> None:
        if processed:
            with self._count_lock:
                self.bytes_processed[kind] += int(processed)

    def query(self, sql: str, params: list | None, kind: str, what: str) -> Any:
        """Run one read with `query_and_wait`; its RowIterator (bytes processed counted)."""
        rows = self.call(
            kind,
            what,
            self.rest.query_and_wait,
            sql,
            job_config=self._config(params),
            location=self.location,
            api_timeout=CALL_TIMEOUT_SECONDS,
            wait_timeout=JOB_TIMEOUT_SECONDS,
            retry=RETRY,
            job_retry=JOB_RETRY,
        )
        self._count_bytes(kind, getattr(rows, "total_bytes_processed", None))
        return rows

    def statement_type(self, sql: str, params: list | None, what: str) -> str:
        """What `sql` is ("SELECT", "DELETE", ...), from a dry run, which runs nothing
        (https://cloud.google.com/bigquery/docs/reference/rest/v2/Job#JobStatistics2,
        `statementType`)."""
        job = self.rest_call("dry_run", what, self.rest.query, sql, job_config=self._config(params, dry_run=True),
                             location=self.location, job_retry=None)  # fmt: skip
        return str(job.statement_type or "")

    def dml(self, sql: str, params: list | None, job_id: str, what: str) -> int:
        """Run one DML statement as the job `job_id`; rows affected.

        The id is deterministic, so a jobs.insert the library retries, or a job created
        before a timeout, is the same job: Google refuses a second one with 409
        (https://cloud.google.com/bigquery/docs/running-jobs#generate-jobid), and that job
        is waited for instead of running the statement twice. A job not done within
        JOB_TIMEOUT_SECONDS is a transient error; the retry's `settle_jobs` waits for it.
        """
        try:
            job = self.rest_call("dml", what, self.rest.query, sql, job_config=self._config(params), job_id=job_id,
                                 location=self.location, job_retry=None)  # fmt: skip
        except errors.TerminalWarehouseError as exc:
            if not isinstance(exc.__cause__, gexc.Conflict):  # 409: the job exists already
                raise
            job = self.rest_call("other", f"get job {job_id}", self.rest.get_job, job_id, location=self.location)
        self.call("other", what, job.result, retry=RETRY, job_retry=None, timeout=JOB_TIMEOUT_SECONDS)  # jobs.get
        self._count_bytes("dml", job.total_bytes_processed)
        return int(job.num_dml_affected_rows or 0)

    def settle_jobs(self, job_id_prefix: str, what: str) -> list[str]:
        """Wait until no job whose id starts with `job_id_prefix` is pending or running:
        each is cancelled, then polled with jobs.get until DONE (a cancel may come too
        late: the job then finishes, and is waited for). The ids settled; a transient
        error if one is still not done after JOB_TIMEOUT_SECONDS.
        (https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/list, `stateFilter`;
        https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/cancel)
        """
        unfinished = [
            job.job_id
            for state in ("pending", "running")
            for job in self.rest_call(
                "other", f"list {state} jobs ({what})",
                lambda **kw: list(self.rest.list_jobs(state_filter=state, **kw)),  # noqa: B023 - called at once
            )
            if job.job_id.startswith(job_id_prefix)
        ]  # fmt: skip
        deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
        for job_id in unfinished:
            self.rest_call("dml", f"cancel job {job_id} ({what})", self.rest.cancel_job, job_id, location=self.location)
            while self.rest_call("other", f"get job {job_id}", self.rest.get_job, job_id, location=self.location).state != "DONE":
                if time.monotonic() > deadline:
                    raise TransientWarehouseError(f"BigQuery {what}: earlier job {job_id} is still running")
                time.sleep(JOB_POLL_SECONDS)
        return unfinished

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
