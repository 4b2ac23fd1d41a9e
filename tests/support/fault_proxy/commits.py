"""Commits of PENDING write streams as Google answers them, and commits that land late.

Google's shape, always on:
- `GetWriteStream` of a committed PENDING stream carries its `commit_time` ("If the
  stream is of PENDING type, empty commit_time means it is not committed",
  google.cloud.bigquery_storage_v1.types.WriteStream). bqemulator leaves it empty.
- A second `BatchCommitWriteStreams` of a committed stream is refused with
  `STREAM_ALREADY_COMMITTED` in `stream_errors` (StorageError.StorageErrorCode;
  "Streams ... cannot be committed multiple times"). bqemulator says
  `INVALID_STREAM_STATE`, "state=COMMITTED".

The fault: `hold(table, seconds, window)` keeps every commit of `table`'s streams sent
in the next `window` seconds (the client library's own retries included) from the
emulator for `seconds`, then forwards it anyway, whether the client still waits or not:
a unary call whose answer is lost may still have been applied (the client cannot tell a
lost answer from a lost request).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable

import grpc

from tests.support.fault_proxy.storage_write import abort_like

WRITE_SERVICE = "/google.cloud.bigquery.storage.v1.BigQueryWrite/"
BATCH_COMMIT = WRITE_SERVICE + "BatchCommitWriteStreams"
GET_WRITE_STREAM = WRITE_SERVICE + "GetWriteStream"
_TABLE = re.compile(r"/tables/(?P<table>[^/]+)")


class CommitShape:
    def __init__(self) -> None:
        self._committed: dict[str, Any] = {}  # stream name -> commit_time (a protobuf Timestamp)
        self._holds: list[tuple[str, float, float]] = []  # (table, until (monotonic), seconds)
        self._lock = threading.Lock()
        self.held = 0  # commits held, then forwarded
        self.holding = 0  # commits being held right now
        self.already_committed = 0  # repeated commits answered STREAM_ALREADY_COMMITTED

    def hold(self, table: str, seconds: float, window: float) -> None:
        with self._lock:
            self._holds.append((table, time.monotonic() + window, seconds))

    def handlers(self, channel: grpc.Channel, metadata: Callable[[grpc.ServicerContext], list]) -> dict[str, grpc.RpcMethodHandler]:
        def forward(method: str, request: bytes, context: grpc.ServicerContext, timeout: float | None) -> bytes:
            try:
                return channel.unary_unary(method)(request, metadata=metadata(context), timeout=timeout)
            except grpc.RpcError as err:
                abort_like(context, err)
                raise

        def batch_commit(request: bytes, context: grpc.ServicerContext) -> bytes:
            held = self._hold_for(request)
            if held:
                return self._late(channel, metadata(context), request, held, context)
            return self._answer_commit(request, forward(BATCH_COMMIT, request, context, context.time_remaining()))

        def get_write_stream(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._answer_get(forward(GET_WRITE_STREAM, request, context, context.time_remaining()))

        return {
            BATCH_COMMIT: grpc.unary_unary_rpc_method_handler(batch_commit),
            GET_WRITE_STREAM: grpc.unary_unary_rpc_method_handler(get_write_stream),
        }

    def _late(self, channel: grpc.Channel, md: list, request: bytes, seconds: float, context: grpc.ServicerContext) -> bytes:
        """Forward `request` after `seconds`, on a thread of its own: a call made from the
        handler's thread ends with the client's deadline, and this one must not."""
        answer: list[bytes] = []

        def land() -> None:
            time.sleep(seconds)
            try:
                answer.append(self._answer_commit(request, channel.unary_unary(BATCH_COMMIT)(request, metadata=md, timeout=30)))
            finally:
                with self._lock:
                    self.holding -= 1
                    self.held += 1

        thread = threading.Thread(target=land, name="late-commit", daemon=True)
        thread.start()
        thread.join()
        if not answer:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the held commit failed upstream")
        return answer[0]

    def _hold_for(self, raw: bytes) -> float:
        from google.cloud.bigquery_storage_v1 import types

        request = types.BatchCommitWriteStreamsRequest.pb().FromString(raw)
        m = _TABLE.search(request.parent)
        now = time.monotonic()
        with self._lock:
            for table, until, seconds in self._holds:
                if m and table == m["table"] and now < until:
                    self.holding += 1
                    return seconds
        return 0.0

    def _answer_commit(self, raw_request: bytes, raw_answer: bytes) -> bytes:
        from google.cloud.bigquery_storage_v1 import types

        code = types.StorageError.StorageErrorCode
        request = types.BatchCommitWriteStreamsRequest.pb().FromString(raw_request)
        answer = types.BatchCommitWriteStreamsResponse.pb().FromString(raw_answer)
        with self._lock:
            repeated = [name for name in request.write_streams if name in self._committed]
            if repeated:  # whatever the emulator says: refused, nothing committed again
                self.already_committed += len(repeated)
                refused = types.BatchCommitWriteStreamsResponse.pb()()
                for name in repeated:
                    refused.stream_errors.add(
                        code=code.STREAM_ALREADY_COMMITTED, entity=name, error_message=f"Stream is already committed: {name}"
                    )
                return refused.SerializeToString()
            if answer.HasField("commit_time") and not answer.stream_errors:
                for name in request.write_streams:
                    self._committed[name] = answer.commit_time
        return raw_answer

    def _answer_get(self, raw_answer: bytes) -> bytes:
        from google.cloud.bigquery_storage_v1 import types

        stream = types.WriteStream.pb().FromString(raw_answer)
        with self._lock:
            commit_time = self._committed.get(stream.name)
        if commit_time is None or stream.HasField("commit_time"):
            return raw_answer
        stream.commit_time.CopyFrom(commit_time)
        return stream.SerializeToString()
