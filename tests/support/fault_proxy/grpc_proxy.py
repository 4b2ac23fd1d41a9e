"""A generic gRPC reverse proxy: bytes in, bytes out, so any service passes unchanged.

`grpc.GenericRpcHandler` routes every method: a few are served by fault objects
(`StorageWriteFaults` for AppendRows, `OrderingGate` for Pub/Sub's Pull/StreamingPull/
Acknowledge/ModifyAckDeadline); the rest are forwarded to the upstream channel with
identity serializers, keeping the call's request-routing metadata
(`x-goog-request-params`) and the upstream status, details and trailers on errors.
Calls are counted by method (`calls`).
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc

from tests.support.fault_proxy.storage_write import abort_like

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Methods whose cardinality is not unary-unary (a generic handler only sees the name).
STREAM_STREAM = {
    "/google.pubsub.v1.Subscriber/StreamingPull",
    "/google.cloud.bigquery.storage.v1.BigQueryWrite/AppendRows",
}
UNARY_STREAM = {"/google.cloud.bigquery.storage.v1.BigQueryRead/ReadRows"}
_DROP_METADATA = {"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-timeout"}


def forward_metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith(":") and k not in _DROP_METADATA]


class GrpcProxy:
    def __init__(self, upstream: str, *, storage_write: Any = None, pubsub: Any = None, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.channel = grpc.insecure_channel(upstream, options=_OPTIONS)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._served: dict[str, grpc.RpcMethodHandler] = {}
        for faults in (storage_write, pubsub):
            if faults is not None:
                self._served.update(faults.handlers(self.channel, forward_metadata))
        self.server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpc-proxy"), options=_OPTIONS)
        self.server.add_generic_rpc_handlers([_Router(self)])
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "GrpcProxy":
        self.server.start()
        return self

    def close(self) -> None:
        self.server.stop(grace=None).wait(10)
        self.channel.close()

    def __enter__(self) -> "GrpcProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1

    # ------------------------------------------------------------------ forwarding
    def handler(self, method: str) -> grpc.RpcMethodHandler:
        self.count(method)
        if method in self._served:
            return self._served[method]
        if method in STREAM_STREAM:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._stream_stream(method, it, ctx))
        if method in UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._unary_stream(method, req, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self.channel.unary_unary(method)(request, metadata=forward_metadata(context), timeout=context.time_remaining())
        except grpc.RpcError as err:
            abort_like(context, err)
            raise

    def _unary_stream(self, method: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self.channel.unary_stream(method)(request, metadata=forward_metadata(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as err:
            abort_like(context, err)

    def _stream_stream(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self.channel.stream_stream(method)(requests, metadata=forward_metadata(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as err:
            if context.is_active():
                abort_like(context, err)


class _Router(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self.proxy.handler(handler_call_details.method)
