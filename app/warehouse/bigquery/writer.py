"""Row writers: the Storage Write API default stream (Arrow rows), or legacy insertAll.

Storage Write: one long-lived `AppendRowsStream` (the client library's connection
manager, which renews a broken connection itself) per table, reused across applies;
opening one costs a round trip or two and short-lived connections count against the
concurrent-connection quota
(https://cloud.google.com/bigquery/docs/write-api-best-practices#connection_pool_management).
Every request carries the writer schema (a batch's columns vary), so requests are sized
with it included, below `MAX_REQUEST_BYTES` (the AppendRows limit is 10 MB:
https://cloud.google.com/bigquery/quotas#write-api-limits). A single row that cannot fit
is not sent: `split_rows` reports it so the warehouse turns it into a `Rejection`.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass

import pyarrow as pa
from google.api_core.future import polling
from google.cloud.bigquery_storage_v1 import types as storage_types
from google.cloud.bigquery_storage_v1.writer import AppendRowsStream

from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError
from app.warehouse.bigquery import errors
from app.warehouse.bigquery.client import BigQueryClient

MAX_REQUEST_BYTES = 9 * 1024 * 1024  # below AppendRows' 10 MB, leaving room for the envelope
REQUEST_OVERHEAD_BYTES = 2048  # stream name, field tags, trace id
APPEND_TIMEOUT_SECONDS = 60.0
MAX_OPEN_STREAMS = 64  # least recently used connections beyond this are closed
# AppendRowsFuture polls for its result; poll briefly instead of the 1 s default step.
_RESULT_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.001, maximum=0.02, multiplier=1.5)

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


class StorageWriter:
    """Appends Arrow rows to tables' default streams over long-lived connections."""

    def __init__(self, client: BigQueryClient, *, emulator: bool = False) -> None:
        self.client = client
        self.emulator = emulator
        self._streams: collections.OrderedDict[str, AppendRowsStream] = collections.OrderedDict()
        self._last_schema: dict[str, bytes] = {}
        # One stream (the markers table's) is shared by all tables' threads; its answers are
        # matched to requests by order, so one append's requests are sent under its lock.
        self._send_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._lock = threading.Lock()

    def append(self, stream_name: str, table: str, requests: list[ArrowRequest]) -> None:
        """Send `requests` on the table's connection and wait for every answer.

        Each request commits on its own (default stream: at-least-once); the caller's
        intent markers make a partly written batch safe to retry.
        """
        if not requests:
            return
        with self._lock:
            send_lock = self._send_locks[stream_name]
        what = f"AppendRows to {table}"
        self.client.count("write", len(requests))
        stream = None
        first_row = 0  # position in `requests` of the first row of the request awaited
        try:
            with self.client.one_at_a_time():
                with send_lock:
                    stream = self._connection(stream_name, requests[0].schema)
                    futures = [stream.send(self._request(stream_name, r)) for r in requests]
                for future, request in zip(futures, requests):
                    future.result(timeout=APPEND_TIMEOUT_SECONDS, polling=_RESULT_POLLING)
                    first_row += request.rows
        except Exception as exc:
            # Answers may now be out of step with requests: start over on a new connection.
            self._drop(stream_name, stream)
            error = errors.translate(exc, what)
            if isinstance(error, errors.RowsRefusedError):  # row numbers across all of `requests`
                error = errors.RowsRefusedError(str(error), {first_row + i: r for i, r in error.row_errors.items()})
            raise error from exc

    def _connection(self, stream_name: str, schema: bytes) -> AppendRowsStream:
        if self.emulator and self._last_schema.get(stream_name, schema) != schema:
            # emulator only: it keeps a connection's first writer schema, while Google takes a
            # changed one on any request (AppendRowsRequest docs: "Provide this value whenever
            # ... you change the input schema"); so reconnect when it changes.
            self._drop(stream_name)
        self._last_schema[stream_name] = schema
        return self._stream(stream_name)

    @staticmethod
    def _request(stream_name: str, r: ArrowRequest) -> storage_types.AppendRowsRequest:
        return storage_types.AppendRowsRequest(
            write_stream=stream_name,
            arrow_rows=storage_types.AppendRowsRequest.ArrowData(
                writer_schema=storage_types.ArrowSchema(serialized_schema=r.schema),
                rows=storage_types.ArrowRecordBatch(serialized_record_batch=r.batch),
            ),
        )

    def _stream(self, stream_name: str) -> AppendRowsStream:
        with self._lock:
            stream = self._streams.get(stream_name)
            if stream is not None:
                self._streams.move_to_end(stream_name)
                return stream
            template = storage_types.AppendRowsRequest(write_stream=stream_name)
            stream = AppendRowsStream(self.client.write_client(), template)
            self._streams[stream_name] = stream
            evicted = self._streams.popitem(last=False)[1] if len(self._streams) > MAX_OPEN_STREAMS else None
        if evicted is not None:
            _close_quietly(evicted)
        return stream

    def _drop(self, stream_name: str, stream: AppendRowsStream | None = None) -> None:
        """Close the table's connection (only if it is still `stream`, when given)."""
        with self._lock:
            current = self._streams.get(stream_name)
            if current is None or (stream is not None and current is not stream):
                return
            del self._streams[stream_name]
        _close_quietly(current)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            _close_quietly(stream)


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
