"""The ingest API: routes, lifespan, health, metrics and docs around the ingest handler.

The ingest itself (limits, gzip, exact parsing, validation, publish, answer) lives in
`app.api.ingest.IngestHandler`. The Pydantic models still describe the contract in
OpenAPI at /docs.

Hot path: `POST /api-log/v1/` is dispatched by `IngestApp.__call__` straight to the
ingest handler wrapped only in `RequestContextMiddleware` (request id, count, log line,
500 on a bug), skipping FastAPI's routing, dependency solving and exception middleware,
which cost more than the validation itself (see docs/benchmarks.md). Answers are the
same either way: the route stays registered (OpenAPI, other methods -> 405) and the
handler answers its own errors.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app import __version__, metrics, tracing
from app.api.docs import install_docs
from app.api.errors import ERROR_SCHEMA, ApiError, error_response
from app.api.examples import REQUEST_EXAMPLES
from app.api.keys import KeyGate, key_ring
from app.api.ingest import INGEST_PATH, MAX_IDEMPOTENCY_KEY_LENGTH, IngestHandler, json_response
from app.api.middleware import RequestContextMiddleware
from app.api.receipts import install_receipts
from app.api.status import install_status_page
from app.receipts import ReceiptWriter, open_receipts
from app.broker import Broker, make_broker
from app.contracts.reload import tables_file_of
from app.api.models import IngestRequest
from app.settings import Settings, get_settings

log = logging.getLogger("app.api")

SUCCESS_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "accepted", "batch_id", "receipt"],
    "properties": {
        "error": {"type": "boolean", "const": False},
        "message": {"type": "string"},
        "accepted": {"type": "integer"},
        "batch_id": {"type": "string"},
        "receipt": {"type": "string", "description": "Where to GET what became of the batch."},
        # tables under contract (docs/contracts.md): present only when something was quarantined or dropped
        "quarantined": {"type": "integer"},
        "quarantine": {
            "type": "array",
            "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "table": {"type": "string"}, "rule": {"type": "string"},
                "column": {"type": ["string", "null"]}, "reason": {"type": "string"},
            }},
        },
        "dropped_columns": {
            "type": "array",
            "items": {"type": "object", "properties": {
                "table": {"type": "string"}, "column": {"type": "string"}, "activities": {"type": "integer"},
            }},
        },
    },
}

INGEST_RESPONSES = {
    "200": {"description": "Accepted: the batch is durably in the broker.", "content": {"application/json": {"schema": SUCCESS_SCHEMA}}},
    **{
        str(code): {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for code, text in (
            (400, "Malformed JSON, gzip or header."),
            (401, "Missing, wrong, expired or revoked API key."),
            (403, "An activity is outside the key's tables or operations; nothing was published."),
            (409, "Idempotency-Key reused with another body."),
            (413, "A limit was exceeded (body, activities, columns, value size, record depth)."),
            (415, "Content-Type is not application/json, or unsupported Content-Encoding."),
            (422, "At least one activity is invalid, or breaks a frozen table contract; every problem is listed with its path."),
            (429, "The key's rate is used up; retry after Retry-After seconds."),
            (503, "The broker cannot take the batch; retry after Retry-After seconds."),
        )
    },
}

INGEST_OPENAPI_EXTRA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/IngestRequest"},
                "examples": REQUEST_EXAMPLES,
            }
        },
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
            "description": "A retried request with the same key creates no duplicate rows.",
        }
    ],
}

_INGEST_PATHS = frozenset((INGEST_PATH, INGEST_PATH.rstrip("/")))


class IngestApp(FastAPI):
    """FastAPI with a direct dispatch of `POST /api-log/v1/` (see the module docstring)."""

    fast_ingest: Any = None  # ASGI callable set by create_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in _INGEST_PATHS
            and self.fast_ingest is not None
            and not self.root_path
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await self.fast_ingest(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, broker: Broker | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tracing.configure("ingest-api", settings.otel_exporter_otlp_endpoint)
        app.state.broker = broker or make_broker(settings)
        app.state.receipts = ReceiptWriter(open_receipts(settings), settings.receipt_retention_days * 86400)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.receipts.close)
            app.state.keys.close()  # keeps the keys' last use for `keys list`
            await asyncio.to_thread(tracing.shutdown)
            if broker is None:
                await asyncio.to_thread(app.state.broker.close)

    app = IngestApp(
        title="User activity ingest API",
        version=__version__,
        description="Accepts row-level activity from the backend and publishes it durably to the stream.",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,  # served by install_docs, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    # --- tables under contract: an invalid file is refused here, at start ---
    app.state.tables_file = tables_file_of(settings)
    app.add_middleware(RequestContextMiddleware, counted_paths=_INGEST_PATHS)
    install_status_page(app)
    install_receipts(app)
    install_docs(app)
    _install_error_handlers(app)

    app.state.keys = KeyGate(key_ring(settings))  # API_KEYS and API_KEYS_FILE
    handler = IngestHandler(settings, app.state.keys, app.state)

    async def ingest_direct(scope: Any, receive: Any, send: Any) -> None:
        response = await handler.handle(Request(scope, receive))
        await response(scope, receive, send)

    app.fast_ingest = RequestContextMiddleware(ingest_direct, counted_paths=_INGEST_PATHS)
    for path, in_schema in ((INGEST_PATH, True), (INGEST_PATH.rstrip("/"), False)):
        app.add_api_route(
            path,
            handler.handle,
            methods=["POST"],
            include_in_schema=in_schema,
            summary="Ingest a batch of user activities",
            responses=INGEST_RESPONSES,
            openapi_extra=INGEST_OPENAPI_EXTRA,
        )

    @app.get("/healthz", summary="Alive")
    async def healthz() -> Response:
        return json_response(200, {"status": "ok"})

    @app.get("/readyz", summary="Ready: the broker is reachable")
    async def readyz(request: Request) -> Response:
        ok, reason = await asyncio.to_thread(request.app.state.broker.ready)
        detail = {"ready": ok, "broker": reason}
        if request.app.state.tables_file.path is not None:
            detail["tables_file"] = request.app.state.tables_file.status()  # a refused change is shown, still ready
        return json_response(200 if ok else 503, detail)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        body, content_type = await asyncio.to_thread(metrics.render, metrics.API, request.app.state.broker)
        return Response(body, media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        model_schema = IngestRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(model_schema.pop("$defs", {}))
        components["IngestRequest"] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every answer outside the ingest handler in the one error shape too."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), [], getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = [{"loc": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        return error_response(422, "request is invalid", details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, "internal error; the batch was not accepted, retry later", [])
