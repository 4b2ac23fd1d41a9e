"""Storage Write API faults: a new column stays invisible to the write stream for a while.

Google: after a column is added to a table, the Storage Write API accepts rows with it
only "after some time (in order of minutes)"
(https://cloud.google.com/java/docs/reference/google-cloud-bigquerystorage/latest/com.google.cloud.bigquery.storage.v1.SchemaAwareStreamWriter;
the client issue https://github.com/googleapis/java-bigquerystorage/issues/1465). Until then
an append whose writer schema has the new field is refused with
`SCHEMA_MISMATCH_EXTRA_FIELDS`. It reaches the client as the `AppendRowsResponse.error`
of that request ("If present, it indicates rows were not accepted into the system. Users
can retry or continue with other append requests within the same connection":
https://cloud.google.com/python/docs/reference/bigquerystorage/latest/google.cloud.bigquery_storage_v1.types.AppendRowsResponse):
a `google.rpc.Status` with code INVALID_ARGUMENT (3), message "Input schema has more
fields than BigQuery schema, extra fields: '<name>'", and a `StorageError` (code
`SCHEMA_MISMATCH_EXTRA_FIELDS` = 7, entity = the stream) packed in its `details`
(`google.cloud.bigquery_storage_v1.types.StorageError`: "can be attached as error details
in the returned rpc Status"; the Java client raises it as
`Exceptions.SchemaMismatchedException`, as users report:
https://github.com/memiiso/debezium-server-bigquery/issues/268). The connection stays open.

A column's type change (`ALTER COLUMN ... SET DATA TYPE`, our type widening) is a schema
update too, seen as late: until the write stream sees it, it still converts rows to the
old type, and an append whose Arrow writer schema gives the column the new type (a
`double` for what it still takes as INT64) is refused. Google documents no StorageError
code for this; it is modelled as the documented generic refusal: the request's
`AppendRowsResponse.error` with INVALID_ARGUMENT ("Indicates a malformed request or
data", same page) and no details, the connection left open.

`SchemaVisibility` records when each column was added or retyped (fed by the REST proxy,
or armed by a test) and keeps the change from the write stream for `lag_seconds`; `StorageWriteFaults` serves AppendRows
through the gRPC proxy, answering requests whose writer schema names a hidden column
with that error and forwarding the others to the emulator on one upstream stream per
client stream (one request, one response, in order, as AppendRows answers).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator

import grpc

APPEND_ROWS = "/google.cloud.bigquery.storage.v1.BigQueryWrite/AppendRows"
_STREAM = re.compile(r"projects/[^/]+/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)/streams/")


class SchemaVisibility:
    """When columns were added, and whether the write stream sees them yet."""

    def __init__(self, lag_seconds: float = 0.0) -> None:
        self.lag_seconds = lag_seconds
        self._added: dict[tuple[str, str], dict[str, float]] = {}
        self._retyped: dict[tuple[str, str], dict[str, tuple[str, float]]] = {}  # column -> (old type, when)
        self._lock = threading.Lock()

    def columns_added(self, dataset: str, table: str, columns: set[str] | list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            known = self._added.setdefault((dataset, table.lower()), {})
            for c in columns:
                known.setdefault(c.lower(), now)

    def added(self, dataset: str, table: str) -> set[str]:
        with self._lock:
            return set(self._added.get((dataset, table.lower()), {}))

    def type_changed(self, dataset: str, table: str, column: str, old_type: str) -> None:
        """`column` was retyped from BigQuery type `old_type`: the write stream keeps the old one a while."""
        with self._lock:
            known = self._retyped.setdefault((dataset, table.lower()), {})
            known.setdefault(column.lower(), (old_type.upper(), time.monotonic()))

    def retyped(self, dataset: str, table: str) -> dict[str, str]:
        with self._lock:
            return {c: old for c, (old, _) in self._retyped.get((dataset, table.lower()), {}).items()}

    def stale_types(self, dataset: str, table: str, fields: dict[str, Any]) -> dict[str, str]:
        """The columns of `fields` (name -> Arrow type) whose Arrow type the write stream's
        stale (old) column type does not take: name -> that old type."""
        now = time.monotonic()
        with self._lock:
            retyped = dict(self._retyped.get((dataset, table.lower()), {}))
        stale: dict[str, str] = {}
        for name, arrow_type in fields.items():
            old = retyped.get(name.lower())
            if old is not None and now - old[1] < self.lag_seconds and not _takes(old[0], arrow_type):
                stale[name] = old[0]
        return stale

    def hidden(self, dataset: str, table: str, columns: list[str]) -> list[str]:
        now = time.monotonic()
        with self._lock:
            added = self._added.get((dataset, table.lower()), {})
            return [c for c in columns if c.lower() in added and now - added[c.lower()] < self.lag_seconds]


class StorageWriteFaults:
    """AppendRows with Google's schema-update lag, and commits as Google answers them
    (`commits.CommitShape`); every other Write method is forwarded."""

    def __init__(self, visibility: SchemaVisibility) -> None:
        from tests.support.fault_proxy.commits import CommitShape  # it uses abort_like, below

        self.visibility = visibility
        self.commits = CommitShape()
        self.rejected: Counter[str] = Counter()  # table -> appends refused for a hidden column
        self.retype_refused: Counter[str] = Counter()  # table -> appends refused for a column's stale type
        self.requests = 0  # AppendRows requests seen
        self.streams = 0  # AppendRows calls (connections) opened
        self.open_now = 0  # AppendRows calls open at the moment
        self.peak_open = 0  # most AppendRows calls open at once
        self._lock = threading.Lock()
        self._holds: list[list[Any]] = []  # [table, appends left to hold, seconds]
        self.held = 0  # appends held, then forwarded (committed) after the client gave up
        self.holding = 0  # appends being held right now

    def hold_appends(self, table: str, seconds: float, times: int = 1) -> None:
        """The next `times` AppendRows requests with rows for `table` get no answer for
        `seconds`, then go to the emulator anyway, whether the client still waits or not.

        Google: an append the client timed out on may still be committed ("at-least-once"
        on the default stream, https://cloud.google.com/bigquery/docs/write-api#default_stream;
        the client cannot tell a lost answer from a lost request), so a retry that does not
        fence it off writes its rows twice.
        """
        with self._lock:
            self._holds.append([table, times, seconds])

    def _hold_for(self, table: str) -> float:
        with self._lock:
            for hold in self._holds:
                if hold[0] == table and hold[1] > 0:
                    hold[1] -= 1
                    self.holding += 1
                    return hold[2]
        return 0.0

    def handlers(self, channel: grpc.Channel, metadata: Callable[[grpc.ServicerContext], list]) -> dict[str, grpc.RpcMethodHandler]:
        def append_rows(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from self._append_rows(channel, metadata(context), requests, context)

        return {APPEND_ROWS: grpc.stream_stream_rpc_method_handler(append_rows), **self.commits.handlers(channel, metadata)}

    def _append_rows(self, channel: grpc.Channel, md: list, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        from google.cloud.bigquery_storage_v1 import types

        with self._lock:
            self.streams += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)
        # A connection counts as closed when its RPC ends (the client's cancel, or our last
        # answer), as Google counts it, not when this thread gets round to its clean-up:
        # that can wait behind the emulator's baton while the client's next call is open.
        ended: list[bool] = []

        def rpc_ended() -> None:
            with self._lock:
                if not ended:
                    ended.append(True)
                    self.open_now -= 1

        if not context.add_callback(rpc_ended):
            rpc_ended()
        upstream = _Upstream(channel, md, context)
        stream_name = ""
        schema: tuple[str, Any] | None = None  # ("arrow_rows"|"proto_rows", writer schema message)
        columns: list[str] = []
        arrow_fields: dict[str, Any] = {}
        try:
            for raw in requests:
                with self._lock:
                    self.requests += 1
                req = types.AppendRowsRequest.pb().FromString(raw)
                stream_name = req.write_stream or stream_name
                found = _writer_schema(req)
                if found is not None:
                    schema, columns = found
                    arrow_fields = _arrow_fields(req)
                m = _STREAM.match(stream_name)
                hidden = self.visibility.hidden(m["dataset"], m["table"], columns) if m else []
                if hidden:
                    with self._lock:
                        self.rejected[m["table"]] += 1
                    yield _schema_mismatch(stream_name, hidden)
                    continue
                stale = self.visibility.stale_types(m["dataset"], m["table"], arrow_fields) if m and _has_rows(req) else {}
                if stale:
                    with self._lock:
                        self.retype_refused[m["table"]] += 1
                    yield _type_mismatch(stream_name, stale, arrow_fields)
                    continue
                if not upstream.opened:  # the first forwarded request must name the stream and schema
                    if not req.write_stream:
                        req.write_stream = stream_name
                    if found is None and schema is not None:
                        getattr(req, schema[0]).writer_schema.CopyFrom(schema[1])
                    raw = req.SerializeToString()
                held = self._hold_for(m["table"]) if m and _has_rows(req) else 0.0
                if held:
                    time.sleep(held)  # the client's deadline passes; the request still goes through
                    answer = upstream.send(raw)
                    with self._lock:
                        self.holding -= 1
                        self.held += 1
                    yield answer
                    continue
                yield upstream.send(raw)
        finally:
            upstream.close()
            rpc_ended()  # a handler returning before gRPC calls back


class _Upstream:
    """One AppendRows call to the emulator, fed one request at a time."""

    def __init__(self, channel: grpc.Channel, md: list, context: grpc.ServicerContext) -> None:
        self._channel, self._md, self._context = channel, md, context
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._responses: Iterator[bytes] | None = None
        self._call: Any = None

    @property
    def opened(self) -> bool:
        return self._call is not None

    def send(self, raw: bytes) -> bytes:
        if self._call is None:
            self._call = self._channel.stream_stream(APPEND_ROWS)(iter(self._queue.get, None), metadata=self._md)
            self._responses = iter(self._call)
        self._queue.put(raw)
        try:
            return next(self._responses)  # type: ignore[arg-type]
        except grpc.RpcError as err:
            abort_like(self._context, err)
        except StopIteration:
            self._context.abort(grpc.StatusCode.UNAVAILABLE, "upstream AppendRows stream ended")
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._queue.put(None)
        if self._call is not None:
            self._call.cancel()


def _has_rows(req: Any) -> bool:
    return req.HasField("arrow_rows") or req.HasField("proto_rows")


def _writer_schema(req: Any) -> tuple[tuple[str, Any], list[str]] | None:
    """(("arrow_rows"|"proto_rows", writer schema), column names) if this request carries one."""
    if req.HasField("arrow_rows") and req.arrow_rows.HasField("writer_schema"):
        import pyarrow as pa

        names = pa.ipc.read_schema(pa.py_buffer(req.arrow_rows.writer_schema.serialized_schema)).names
        return ("arrow_rows", req.arrow_rows.writer_schema), list(names)
    if req.HasField("proto_rows") and req.proto_rows.HasField("writer_schema"):
        names = [f.name for f in req.proto_rows.writer_schema.proto_descriptor.field]
        return ("proto_rows", req.proto_rows.writer_schema), names
    return None


# BigQuery column type -> the Arrow types an append into it takes (our writer's mapping, types.py)
_ARROW_TAKEN: dict[str, tuple[str, ...]] = {
    "INT64": ("int8", "int16", "int32", "int64"), "INTEGER": ("int8", "int16", "int32", "int64"),
    "FLOAT64": ("float", "double", "int64"), "FLOAT": ("float", "double", "int64"),
    "NUMERIC": ("decimal128", "int64"), "BIGNUMERIC": ("decimal128", "decimal256", "int64"),
}


def _takes(column_type: str, arrow_type: Any) -> bool:
    taken = _ARROW_TAKEN.get(column_type)
    if taken is None:
        return True  # types a widening never leaves behind
    name = str(arrow_type)
    return any(name == t or name.startswith(t + "(") for t in taken)


def _arrow_fields(req: Any) -> dict[str, Any]:
    if not (req.HasField("arrow_rows") and req.arrow_rows.HasField("writer_schema")):
        return {}
    import pyarrow as pa

    schema = pa.ipc.read_schema(pa.py_buffer(req.arrow_rows.writer_schema.serialized_schema))
    return {f.name: f.type for f in schema}


def _type_mismatch(stream: str, stale: dict[str, str], fields: dict[str, Any]) -> bytes:
    from google.cloud.bigquery_storage_v1 import types
    from google.rpc import code_pb2, status_pb2

    message = "; ".join(f"Input schema field '{c}' has type {fields[c]}, BigQuery schema has {old}" for c, old in stale.items())
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    return types.AppendRowsResponse.pb()(error=status, write_stream=stream).SerializeToString()


def _schema_mismatch(stream: str, hidden: list[str]) -> bytes:
    from google.cloud.bigquery_storage_v1 import types
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, status_pb2

    message = "Input schema has more fields than BigQuery schema, extra fields: " + ", ".join(f"'{c}'" for c in hidden)
    detail = any_pb2.Any()
    detail.Pack(
        types.StorageError.pb()(
            code=types.StorageError.StorageErrorCode.SCHEMA_MISMATCH_EXTRA_FIELDS, entity=stream, error_message=message
        )
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    return types.AppendRowsResponse.pb()(error=status, write_stream=stream).SerializeToString()


def abort_like(context: grpc.ServicerContext, err: grpc.RpcError) -> None:
    """End the proxied call with the upstream call's status, details and trailers."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNAVAILABLE
    details = err.details() if hasattr(err, "details") else str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    if trailers:
        context.set_trailing_metadata([(k, v) for k, v in trailers if not k.startswith(":")])
    context.abort(code or grpc.StatusCode.UNKNOWN, details or "")
