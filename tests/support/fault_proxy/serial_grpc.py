"""A gRPC proxy that hands bqemulator one call at a time.

bqemulator runs its REST API and its Storage Write/Read API on one DuckDB connection and
mixes up or deadlocks concurrent calls, which Google never does. This proxy takes the
same baton as the REST proxy (`bq_shape.emulator_lock`): a unary call holds it while it
runs, a stream holds it from each request sent until its answer arrives.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import grpc

from tests.support.fault_proxy.bq_shape import emulator_lock
from tests.support.fault_proxy.grpc_proxy import GrpcProxy


class SerialGrpcProxy(GrpcProxy):
    def __init__(self, upstream: str, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self.baton = emulator_lock(upstream)

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.baton:
            return super()._unary(method, request, context)

    def _unary_stream(self, method: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.baton:
            yield from super()._unary_stream(method, request, context)

    def _stream_stream(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        held = [0]  # requests sent whose answer has not come back, each holding the baton
        ended = [False]  # the call is over: a baton taken after that is handed back at once
        guard = threading.Lock()

        def one_at_a_time() -> Iterator[bytes]:
            for request in requests:
                self.baton.acquire()
                with guard:
                    if ended[0]:  # gRPC's request thread outlived the call (upstream gone)
                        self.baton.release()
                        return
                    held[0] += 1
                yield request

        try:
            for response in super()._stream_stream(method, one_at_a_time(), context):
                with guard:
                    answered = held[0] > 0
                    held[0] -= answered
                if answered:
                    self.baton.release()
                yield response
        finally:
            with guard:
                ended[0] = True
                left, held[0] = held[0], 0
            for _ in range(left):
                self.baton.release()
