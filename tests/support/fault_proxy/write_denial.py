"""Storage Write API calls refused with gRPC PERMISSION_DENIED for a while (a revoked role).

Google refuses a Write API call whose caller lacks `bigquery.tables.updateData` with the
call's gRPC status PERMISSION_DENIED, "Permission 'TABLES_UPDATE_DATA' denied on resource
'projects/<p>/datasets/<d>/tables/<t>' (or it may not exist)"
(https://cloud.google.com/bigquery/docs/write-api#required_permissions; the status and
message as users report it: https://github.com/apache/beam/issues/20890). For AppendRows
the call ends with that status (checked at each request: connections stay open).

`WriteDenial` serves every BigQueryWrite method through a `GrpcProxy`: while armed it
ends each call with that status, otherwise it forwards it unchanged (bytes in, bytes
out). It sits in a proxy of its own in front of the stack's Storage Write proxy, so the
other Storage Write faults stay as they are.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterator

import grpc

from tests.support.fault_proxy.storage_write import _Upstream, abort_like

WRITE_SERVICE = "/google.cloud.bigquery.storage.v1.BigQueryWrite/"
UNARY_METHODS = ("CreateWriteStream", "GetWriteStream", "FinalizeWriteStream", "BatchCommitWriteStreams", "FlushRows")
APPEND_ROWS = WRITE_SERVICE + "AppendRows"


class WriteDenial:
    """PERMISSION_DENIED on every Storage Write call from `deny(seconds)` on, for that long."""

    def __init__(self, resource: str = "projects/p/datasets/d/tables/t") -> None:
        self.message = f"Permission 'TABLES_UPDATE_DATA' denied on resource '{resource}' (or it may not exist)."
        self.refused: Counter[str] = Counter()  # method -> calls refused
        self._until = 0.0
        self._lock = threading.Lock()

    def deny(self, seconds: float) -> None:
        with self._lock:
            self._until = time.monotonic() + seconds

    @property
    def active(self) -> bool:
        return time.monotonic() < self._until

    def handlers(self, channel: grpc.Channel, metadata: Callable[[grpc.ServicerContext], list]) -> dict[str, grpc.RpcMethodHandler]:
        def unary(method: str) -> grpc.RpcMethodHandler:
            def call(request: bytes, context: grpc.ServicerContext) -> bytes:
                self._refuse_if_active(method, context)
                try:
                    return channel.unary_unary(method)(request, metadata=metadata(context), timeout=context.time_remaining())
                except grpc.RpcError as err:
                    abort_like(context, err)
                    raise

            return grpc.unary_unary_rpc_method_handler(call)

        def append_rows(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            # checked per request: a writer keeps one AppendRows connection open across appends
            upstream = _Upstream(channel, metadata(context), context)
            try:
                for raw in requests:
                    self._refuse_if_active(APPEND_ROWS, context)
                    yield upstream.send(raw)
            finally:
                upstream.close()

        served = {WRITE_SERVICE + name: unary(WRITE_SERVICE + name) for name in UNARY_METHODS}
        served[APPEND_ROWS] = grpc.stream_stream_rpc_method_handler(append_rows)
        return served

    def _refuse_if_active(self, method: str, context: grpc.ServicerContext) -> None:
        if self.active:
            with self._lock:
                self.refused[method.rsplit("/", 1)[1]] += 1
            context.abort(grpc.StatusCode.PERMISSION_DENIED, self.message)
