"""One ASGI middleware for what every request needs: an id, a count, a log line.

- Request id: an incoming `X-Request-ID` (if it is a sane token) or a fresh one, bound
  in `app.logs.request_id_var` for every log line of the request and echoed in the
  response's `X-Request-ID` header.
- `ingest_requests_total{status}`: counted here, from the status actually sent, so every
  path counts (200, the handlers' 4xx, FastAPI's validation 422, 404/405, and 500).
- Unexpected exceptions become the usual 500 error body here (inside Starlette's
  outermost error middleware), so even a 500 carries the request id.
- The raw headers by name, read once into `scope[HEADERS_BY_NAME]` for the handlers.
- One `request finished` line per request (method, path, status, duration); probes and
  scrapes (`/healthz`, `/readyz`, `/metrics`, `/status`) log it at debug only.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Awaitable, Callable, Iterable

from app import metrics
from app.api.auth import request_headers
from app.api.errors import error_response
from app.messages.ids import random_hex_id
from app.logs import batch_id_var, log_event, request_id_var, trace_id_var

log = logging.getLogger("app.api")

REQUEST_ID_HEADER = b"x-request-id"  # ASGI servers send header names lowercased (Starlette relies on it too)
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}\Z")
# The scope key of the request's raw headers by lower-case name (`auth.request_headers`).
HEADERS_BY_NAME = "app.headers_by_name"
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/status", "/favicon.ico"})

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def request_id_from(headers: dict[bytes, bytes]) -> str:
    """The caller's X-Request-ID (raw headers by name) if it is a plain token of at most 128 chars, else a new one."""
    value = headers.get(REQUEST_ID_HEADER)
    if value is not None:
        candidate = value.decode("latin-1").strip()
        if _REQUEST_ID_OK.match(candidate):
            return candidate
    return random_hex_id()  # 32 hex digits like uuid4().hex, without a system call per id


class RequestContextMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], counted_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.counted_paths = frozenset(counted_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope[HEADERS_BY_NAME] = request_headers(scope)  # read once, for the handler too
        request_id = request_id_from(headers)
        rid_token = request_id_var.set(request_id)
        batch_token = batch_id_var.set(None)
        trace_token = trace_id_var.set(None)
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        path = scope.get("path", "")
        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                if status is not None:  # the response is on its way; nothing left to answer
                    raise
                log.exception("unexpected error")
                response = error_response(500, "internal error; the batch was not accepted, retry later", [])
                await response(scope, receive, send_with_id)
        finally:
            final = status if status is not None else 500
            if path in self.counted_paths:
                self._count(final)
            fields = {
                "method": scope.get("method"),
                "path": path,
                "status": final,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
            extra = scope.get("log_extra")
            if extra:
                fields.update(extra)
            log_event(log, logging.DEBUG if path in QUIET_PATHS else logging.INFO, "request finished", fields)
            trace_id_var.reset(trace_token)
            batch_id_var.reset(batch_token)
            request_id_var.reset(rid_token)

    @staticmethod
    def _count(status: int) -> None:
        requests = metrics.INGEST.requests
        requests[status] = requests.get(status, 0) + 1
