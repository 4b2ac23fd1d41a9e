"""Row writers: the Storage Write API (Arrow rows), or legacy insertAll.

Storage Write, two ways:
- `stage` then `commit` (a table's rows): a PENDING stream of their own, finalized, then
  committed with BatchCommitWriteStreams. Rows become visible at the commit, all at
  once, and a stream never committed leaves nothing, so an append that times out on
  our side and lands later on Google's cannot add rows after a retry
  (https://cloud.google.com/bigquery/docs/write-api#pending_type: "records are buffered
  in a pending state until you commit the stream"; BatchCommitWriteStreams: "Streams must
  be finalized before commit and cannot be committed multiple times").
- `append` (marker rows): the default stream, at least once; a marker written twice
  means the same.
Connections come from a small bounded pool shared by all tables (`connections.py`):
default-stream connections are reused across applies, a pending stream's is closed with
it; opening one costs a round trip or two and connections count against the
concurrent-connection quota
(https://cloud.google.com/bigquery/docs/write-api-best-practices#connection_pool_management).
Every request carries the writer schema (a batch's columns vary), so requests are sized
with it included, below `MAX_REQUEST_BYTES` (the AppendRows limit is 10 MB:
https://cloud.google.com/bigquery/quotas#write-api-limits). A single row that cannot fit
is not sent: `split_rows` reports it so the warehouse turns it into a `Rejection`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from google.api_core import exceptions as gexc
from google.api_core import retry as retries
from google.api_core.future import polling
from google.cloud.bigquery_storage_v1 import types as storage_types
from google.cloud.bigquery_storage_v1 import writer as storage_writer
from google.cloud.bigquery_storage_v1.writer import AppendRowsStream

from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError
from app.warehouse.bigquery import errors
from app.warehouse.bigquery.client import BigQueryClient
from app.warehouse.bigquery.connections import Connection, ConnectionPool

MAX_REQUEST_BYTES = 9 * 1024 * 1024  # below AppendRows' 10 MB, leaving room for the envelope
REQUEST_OVERHEAD_BYTES = 2048  # stream name, field tags, trace id
APPEND_TIMEOUT_SECONDS = 60.0  # one append: a free connection, its open and every answer
IDLE_SECONDS = 60.0  # a connection unused this long is closed
SETTLE_PAUSE_SECONDS = 0.5  # between reads of a stream whose commit's outcome is unknown
# Commit refusals after which the stream can never be committed (all rows left out).
_NEVER_COMMITS = {
    storage_types.StorageError.StorageErrorCode.STREAM_NOT_FOUND,
    storage_types.StorageError.StorageErrorCode.INVALID_STREAM_STATE,
    storage_types.StorageError.StorageErrorCode.INVALID_STREAM_TYPE,
}
# The unary Write calls' retry, bounded by our deadline: the library's default retries
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and UNAVAILABLE for up to 600 s
# (bigquery_storage_v1 big_query_write transports/base.py), past any deadline of ours.
_TRANSIENT = retries.if_exception_type(gexc.DeadlineExceeded, gexc.ResourceExhausted, gexc.ServiceUnavailable)
# AppendRowsFuture polls for its result; poll briefly instead of the 1 s default step.
_RESULT_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.001, maximum=0.02, multiplier=1.5)
# Opening an AppendRows call, the pinned client sleeps in steps of `_WRITE_OPEN_INTERVAL`
# (80 ms) until the call is active (bigquery_storage_v1/writer.py `_Connection._open`),
# so every open, one per table and apply (each has a PENDING stream of its own), took at
# least 80 ms however soon the call was up; it has no parameter for it.
OPEN_POLL_SECONDS = 0.005
storage_writer._WRITE_OPEN_INTERVAL = OPEN_POLL_SECONDS

MAX_INSERT_ALL_BYTES = 8 * 1024 * 1024  # insertAll: 10 MB per request
MAX_INSERT_ALL_ROWS = 10_000
MAX_INSERT_ID_CHARS = 128  # https://cloud.google.com/bigquery/quotas#streaming_inserts


@dataclass(frozen=True, slots=True)
class ArrowRequest:
    schema: bytes  # serialized Arrow schema, sent with every request
    batch: bytes  # serialized record batch
    rows: int


def split_rows(
    batch: pa.RecordBatch, limit: int = MAX_REQUEST_BYTES
) -> tuple[list[ArrowRequest], list[tuple[int, int]]]:
    """AppendRows requests for `batch`, each within `limit` with the schema included.

    Returns (requests, oversized): `oversized` lists (row position, bytes) of single rows
    that cannot fit in any request; they are left out.
    """
    schema = batch.schema.serialize().to_pybytes()
    budget = limit - len(schema) - REQUEST_OVERHEAD_BYTES
    requests: list[ArrowRequest] = []
    oversized: list[tuple[int, int]] = []
    pending: list[tuple[int, pa.RecordBatch]] = [(0, batch)]  # (offset of the slice, slice)
    while pending:
        offset, part = pending.pop(0)
        data = part.serialize().to_pybytes()
        if len(data) <= budget:
            if part.num_rows:
                requests.append(ArrowRequest(schema, data, part.num_rows))
        elif part.num_rows == 1:
            oversized.append((offset, len(data) + len(schema)))
        else:
            half = part.num_rows // 2
            pending[0:0] = [(offset, part.slice(0, half)), (offset + half, part.slice(half))]
    return requests, oversized


@dataclass(frozen=True, slots=True)
class StagedStream:
    """A finalized PENDING stream whose rows wait for `StorageWriter.commit`."""

    parent: str
    table: str
    name: str
    deadline: float  # time.monotonic() by which the commit must be done


class StorageWriter:
    """Appends Arrow rows to tables' default streams over a bounded pool of connections.

    Every append has a deadline of ours (`timeout`): waiting for a free connection,
    opening one (the client library would wait up to 600 s) and every answer. Past it the
    append fails as a `TransientWarehouseError`; its connection is dropped (answers may be
    out of step) and the caller's intent markers make whatever landed safe to retry.
    """

    def __init__(
        self,
        client: BigQueryClient,
        *,
        connections: int = 4,
        idle_seconds: float = IDLE_SECONDS,
        timeout: float = APPEND_TIMEOUT_SECONDS,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.pool = ConnectionPool(connections, idle_seconds=idle_seconds, close=_close_quietly)
        self.streams_created = 0  # PENDING streams (bench, docs: against the CreateWriteStream quota)
        self._created_lock = threading.Lock()
        self._unsettled: dict[str, StagedStream] = {}  # stream name -> a commit whose outcome is unknown
        self._unsettled_lock = threading.Lock()

    def stage(self, parent: str, table: str, requests: list[ArrowRequest]) -> StagedStream | None:
        """`requests` on a PENDING stream of their own, finalized, not committed yet.

        `parent` is the table's path (projects/p/datasets/d/tables/t). Until `commit` the
        rows are invisible, and a stream never committed leaves nothing (Google drops it),
        so after any failure the caller may retry with a new stream. Each call has our
        deadline, counted from here to the end of the commit.
        """
        if not requests:
            return None
        deadline = time.monotonic() + self.timeout
        write = self.client.write_client()
        pending = storage_types.WriteStream(type_=storage_types.WriteStream.Type.PENDING)
        stream = self.client.call(
            "write_stream", f"creating a write stream for {table}", write.create_write_stream,
            parent=parent, write_stream=pending, **_within(deadline),
        )  # fmt: skip
        with self._created_lock:
            self.streams_created += 1
        self._append(stream.name, table, requests, deadline, keep=False)
        self.client.call(
            "write_stream", f"finalizing the write stream of {table}", write.finalize_write_stream,
            name=stream.name, **_within(deadline),
        )  # fmt: skip
        return StagedStream(parent, table, stream.name, deadline)

    def commit(self, staged: StagedStream) -> None:
        """Make a staged stream's rows visible, all at once (BatchCommitWriteStreams).

        A commit whose answer is lost (our deadline, a dropped connection) may still be
        applied by Google later; after a retry had cleaned up and rewritten the rows, it
        would add them a second time. So its outcome is settled before anything else
        happens: the stream itself says whether it is committed (GetWriteStream: "If the
        stream is of PENDING type, empty commit_time means it is not committed",
        google.cloud.bigquery_storage_v1.types.WriteStream), and if not, we commit it
        again: a stream commits once, and a second commit is answered
        `STREAM_ALREADY_COMMITTED` (StorageError.StorageErrorCode). Either way the stream
        ends committed exactly once, or refused for good (`INVALID_STREAM_STATE`: expired).
        A commit still unsettled at our deadline fails the apply, and the stream is
        settled before the table's next clean-up (`settle`).
        """
        with self._unsettled_lock:
            self._unsettled[staged.name] = staged
        try:
            outcome = self._commit_once(staged)
        except TransientWarehouseError:
            outcome = None  # unknown: the request may still be applied
        if outcome is None:
            outcome = self._settle_one(staged, time.monotonic() + self.timeout)
        if outcome is not None:  # known: nothing of it can land later
            with self._unsettled_lock:
                self._unsettled.pop(staged.name, None)
        if not outcome:
            raise TransientWarehouseError(f"BigQuery refused the commit of the write stream of {staged.table}")

    def settle(self, table: str) -> None:
        """Settle the commits of `table` left unknown by an earlier apply, before its
        rows are cleaned up and rewritten; raises while one stays unknown."""
        with self._unsettled_lock:
            waiting = [s for s in self._unsettled.values() if s.table == table]
        for staged in waiting:
            if self._settle_one(staged, time.monotonic() + self.timeout) is None:
                raise TransientWarehouseError(f"BigQuery: the outcome of a commit to {table} is still unknown")
            with self._unsettled_lock:
                self._unsettled.pop(staged.name, None)

    def _settle_one(self, staged: StagedStream, deadline: float) -> bool | None:
        """Ask the stream, commit it again if needed, until the outcome is known:
        committed (True), refused for good (False), or None at `deadline`."""
        write = self.client.write_client()
        while time.monotonic() < deadline:
            try:
                stream = self.client.call(
                    "write_stream", f"reading the write stream of {staged.table}", write.get_write_stream,
                    name=staged.name, **_within(deadline),
                )  # fmt: skip
                if stream.commit_time:
                    return True
                outcome = self._commit_once(staged, deadline)
                if outcome is not None:
                    return outcome
            except TransientWarehouseError:
                pass  # asked again after the pause
            time.sleep(min(SETTLE_PAUSE_SECONDS, _remaining(deadline)))  # an answer that says neither, too
        return None

    def _commit_once(self, staged: StagedStream, deadline: float | None = None) -> bool | None:
        """One BatchCommitWriteStreams of `staged` (not retried here: `_settle_one` asks
        the stream first): True when it is committed (now or before), False when refused
        for good, None when Google's answer says neither."""
        committed = self.client.call(
            "write_stream", f"committing the write stream of {staged.table}",
            self.client.write_client().batch_commit_write_streams,
            request=storage_types.BatchCommitWriteStreamsRequest(parent=staged.parent, write_streams=[staged.name]),
            retry=None, timeout=_remaining(staged.deadline if deadline is None else deadline),
        )  # fmt: skip
        if committed.commit_time and not committed.stream_errors:
            return True
        codes = {e.code for e in committed.stream_errors}
        if codes == {storage_types.StorageError.StorageErrorCode.STREAM_ALREADY_COMMITTED}:
            return True
        if codes & _NEVER_COMMITS:
            return False
        return None

    def append(
        self, stream_name: str, table: str, requests: list[ArrowRequest], timeout: float | None = None
    ) -> None:
        """Send `requests` on a connection of the pool and wait for every answer.

        Each request commits on its own (default stream: at-least-once); the caller's
        intent markers make a partly written batch safe to retry.
        """
        if not requests:
            return
        self._append(stream_name, table, requests, time.monotonic() + (self.timeout if timeout is None else timeout), keep=True)

    def _append(self, stream_name: str, table: str, requests: list[ArrowRequest], deadline: float, *, keep: bool) -> None:
        """`requests` on a pooled connection to `stream_name`, every answer awaited; the
        connection is kept for reuse (`keep`) or closed (a stream written once)."""
        what = f"AppendRows to {table}"
        self.client.count("write", len(requests))
        conn = self.pool.acquire(stream_name, deadline)
        first_row = 0  # position in `requests` of the first row of the request awaited
        try:
            futures = self._send(conn, requests, deadline)
            for future, request in zip(futures, requests):
                future.result(timeout=_remaining(deadline), polling=_RESULT_POLLING)
                first_row += request.rows
        except Exception as exc:
            self.pool.discard(conn, closed=exc.closed if isinstance(exc, OpenPastDeadline) else None)
            error = errors.translate(exc, what)
            if isinstance(error, errors.RowsRefusedError):  # row numbers across all of `requests`
                error = errors.RowsRefusedError(str(error), {first_row + i: r for i, r in error.row_errors.items()})
            raise error from exc
        if keep:
            self.pool.release(conn)
        else:
            self.pool.discard(conn)

    def _send(self, conn: Connection, requests: list[ArrowRequest], deadline: float) -> list[Any]:
        stream_name = conn.stream_name
        conn.writer_schema = requests[0].schema
        pending = [self._request(stream_name, r) for r in requests]
        futures = []
        if conn.stream is None:
            stream = AppendRowsStream(self.client.write_client(), storage_types.AppendRowsRequest(write_stream=stream_name))
            futures.append(_open_within(stream, pending.pop(0), deadline, what=f"opening AppendRows to {stream_name}"))
            conn.stream = stream
        futures.extend(conn.stream.send(r) for r in pending)
        return futures

    @staticmethod
    def _request(stream_name: str, r: ArrowRequest) -> storage_types.AppendRowsRequest:
        return storage_types.AppendRowsRequest(
            write_stream=stream_name,
            arrow_rows=storage_types.AppendRowsRequest.ArrowData(
                writer_schema=storage_types.ArrowSchema(serialized_schema=r.schema),
                rows=storage_types.ArrowRecordBatch(serialized_record_batch=r.batch),
            ),
        )

    @property
    def open_streams(self) -> int:
        return self.pool.alive

    def close(self) -> None:
        self.pool.close()


def _within(deadline: float) -> dict[str, Any]:
    """A unary Write call's `retry` and `timeout`, both ending at `deadline`."""
    left = _remaining(deadline)
    return {"retry": retries.Retry(predicate=_TRANSIENT, initial=0.1, maximum=1.0, timeout=left), "timeout": left}


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _open_within(stream: AppendRowsStream, first: storage_types.AppendRowsRequest, deadline: float, what: str) -> Any:
    """`stream.send(first)`, which opens the connection, bounded by `deadline`.

    The library's open blocks (up to 600 s) holding the connection's own lock, so it runs
    on a thread of its own; past the deadline the caller gets a `TransientWarehouseError`
    and the stream is closed once the open returns.
    """
    opened: concurrent.futures.Future = concurrent.futures.Future()

    def open_stream() -> None:
        try:
            opened.set_result(stream.send(first))
        except BaseException as exc:  # handed to the waiting caller
            opened.set_exception(exc)

    threading.Thread(target=open_stream, name="storage-write-open", daemon=True).start()
    try:
        return opened.result(timeout=_remaining(deadline))
    except concurrent.futures.TimeoutError:
        closed: concurrent.futures.Future = concurrent.futures.Future()

        def close_when_opened(_: concurrent.futures.Future) -> None:
            _close_quietly(stream)
            closed.set_result(None)

        opened.add_done_callback(close_when_opened)
        raise OpenPastDeadline(f"{what}: no connection within our deadline", closed) from None


class OpenPastDeadline(TransientWarehouseError):
    """An AppendRows open that outlived our deadline; `closed` is done once the stream,
    still opening, has been closed (the pool keeps its slot taken until then)."""

    def __init__(self, message: str, closed: concurrent.futures.Future) -> None:
        super().__init__(message)
        self.closed = closed


def _close_quietly(stream: AppendRowsStream) -> None:
    try:
        stream.close()
    except Exception:  # closing a connection that already ended is fine
        pass


def insert_id(dedup_id: str, index: int) -> str:
    """insertAll row id: a digest, so a long dedup_id never exceeds 128 characters."""
    return hashlib.sha256(f"{dedup_id}\x00{index}".encode()).hexdigest()


class InsertAllWriter:
    """Legacy insertAll (`bigquery_insert_mode=insert_all`), for projects without Storage Write."""

    def __init__(self, client: BigQueryClient) -> None:
        self.client = client

    @staticmethod
    def chunks(rows: list[dict], row_ids: list[str], sizes: list[int]) -> list[tuple[list[dict], list[str]]]:
        out: list[tuple[list[dict], list[str]]] = []
        current: list[dict] = []
        current_ids: list[str] = []
        size = 0
        for row, rid, n in zip(rows, row_ids, sizes):
            if current and (size + n > MAX_INSERT_ALL_BYTES or len(current) >= MAX_INSERT_ALL_ROWS):
                out.append((current, current_ids))
                current, current_ids, size = [], [], 0
            current.append(row)
            current_ids.append(rid)
            size += n
        if current:
            out.append((current, current_ids))
        return out

    def insert(self, table_id: str, table: str, chunks: list[tuple[list[dict], list[str]]]) -> None:
        for rows, row_ids in chunks:
            row_errors = self.client.insert_rows_json(table_id, rows, row_ids)
            if row_errors:
                text = str(row_errors[:5])
                found = {e.get("reason") for item in row_errors for e in item.get("errors", [])}
                if found <= errors.TRANSIENT_ROW_REASONS:
                    raise TransientWarehouseError(f"BigQuery insertAll to {table}: {text}")
                raise TerminalWarehouseError(f"BigQuery insertAll to {table} refused rows: {text}")
