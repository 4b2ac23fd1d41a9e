"""The ingest API: validate a batch at the edge, publish it durably, answer.

The body is read and checked by hand (size, content type, gzip, JSON) before Pydantic
models are involved, so limits hold before any work is spent and every failure maps
to a 4xx in the one error shape. The Pydantic models still describe the contract in
OpenAPI at /docs.

Hot path: `POST /api-log/v1/` is dispatched by `IngestApp.__call__` straight to the
ingest handler wrapped only in `RequestContextMiddleware` (request id, count, log line,
500 on a bug), skipping FastAPI's routing, dependency solving and exception middleware,
which cost more than the validation itself (see docs/benchmarks.md). Answers are the
same either way: the route stays registered (OpenAPI, other methods -> 405) and
`ApiError` maps to the same error response.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app import __version__, metrics
from app.api.auth import is_authorized, parse_api_keys
from app.api.docs import install_docs
from app.api.errors import ERROR_SCHEMA, ApiError, error_response
from app.api.examples import REQUEST_EXAMPLES
from app.api.middleware import RequestContextMiddleware
from app.api.status import install_status_page
from app.broker import Broker, BrokerUnavailable, IdempotencyConflict, make_broker
from app.logs import batch_id_var
from app.pipeline.codec import encode_batch, new_batch_id
from app.schema.validation import BatchInvalid, IngestRequest, LimitExceeded, validate_batch
from app.schema.values import loads_exact
from app.settings import Settings, get_settings

log = logging.getLogger("app.api")

INGEST_PATH = "/api-log/v1/"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
RETRY_AFTER_SECONDS = "1"

SUCCESS_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "accepted", "batch_id"],
    "properties": {
        "error": {"type": "boolean", "const": False},
        "message": {"type": "string"},
        "accepted": {"type": "integer"},
        "batch_id": {"type": "string"},
    },
}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, gunzipped if needed, refusing more than `limit` bytes either way."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send identity or gzip")
    # Decompress with a cap so a small gzip bomb cannot expand past the body limit.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise ApiError(413, f"decompressed request body is larger than the limit of {limit} bytes")
        if not inflater.eof:
            raise ApiError(400, "gzip body is truncated")
    except zlib.error as exc:
        raise ApiError(400, f"gzip body cannot be decompressed: {exc}") from None
    return out


def _activity_count(body: Any) -> int:
    activities = body.get("user_activities") if isinstance(body, dict) else None
    return len(activities) if isinstance(activities, list) else 0


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
        app.state.broker = broker or make_broker(settings)
        try:
            yield
        finally:
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
    api_key_digests = parse_api_keys(settings.api_keys)
    app.add_middleware(RequestContextMiddleware, counted_paths=(INGEST_PATH, INGEST_PATH.rstrip("/")))
    install_status_page(app)
    install_docs(app)

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

    in_flight = 0

    async def ingest(request: Request) -> Response:
        # Bounded work in progress: bodies are read into memory, so refuse new requests
        # beyond the limit instead of buffering without bound.
        nonlocal in_flight
        if in_flight >= settings.max_in_flight_requests:
            raise ApiError(
                503, f"too many requests in progress (limit {settings.max_in_flight_requests}); retry later",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        in_flight += 1
        try:
            return await _ingest(request)
        finally:
            in_flight -= 1

    async def _ingest(request: Request) -> Response:
        if not is_authorized(request, api_key_digests):
            raise ApiError(
                401, "missing or wrong API key: send Authorization: Bearer <key> or X-API-Key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        content_type = request.headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH):
            raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        raw = await _read_body(request, settings.max_body_bytes)
        try:
            body = loads_exact(raw)  # numbers keep their exact value (a record's big integer too)
        except ValueError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
        try:
            activities = validate_batch(
                body,
                max_activities=settings.max_activities,
                max_columns=settings.max_columns,
                max_value_bytes=settings.max_value_bytes,
                max_record_depth=settings.max_record_depth,
            )
        except LimitExceeded as exc:
            metrics.ACTIVITIES_REJECTED.inc(_activity_count(body))
            raise ApiError(413, str(exc)) from None
        except BatchInvalid as exc:
            metrics.ACTIVITIES_REJECTED.inc(_activity_count(body))
            raise ApiError(422, f"batch rejected: {len(exc.details)} problem(s); nothing was published", exc.details) from None

        fingerprint = hashlib.sha256(raw).hexdigest() if idempotency_key is not None else None
        batch_id = new_batch_id(idempotency_key, fingerprint)  # another body, another batch id
        batch_id_var.set(batch_id)  # every later line of this request carries it (app.logs)
        messages = encode_batch(activities, batch_id)
        started = time.perf_counter()
        try:
            result = await request.app.state.broker.publish(
                messages, batch_id=batch_id, idempotency_key=idempotency_key, request_fingerprint=fingerprint
            )
        except IdempotencyConflict:
            metrics.ACTIVITIES_REJECTED.inc(len(activities))
            raise ApiError(409, "Idempotency-Key was already used with a different body") from None
        except BrokerUnavailable as exc:
            log.warning("broker unavailable: %s", exc)
            raise ApiError(
                503, "the stream cannot take the batch right now; nothing was accepted, retry later",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            ) from None
        publish_seconds = time.perf_counter() - started
        metrics.PUBLISH_SECONDS.observe(publish_seconds)
        metrics.ACTIVITIES_ACCEPTED.inc(0 if result.duplicate else len(activities))
        if not result.duplicate:
            request.app.state.event_rate.record(len(activities))  # the status page's chart
        # One INFO line per request: the middleware's `request finished` carries these.
        request.scope["log_extra"] = {
            "activities": len(activities), "messages": len(messages), "duplicate": result.duplicate,
            "publish_ms": round(publish_seconds * 1000, 2),
        }
        headers = {"Idempotent-Replayed": "true"} if result.duplicate else None
        return _json(
            200,
            {
                "error": False,
                "message": "already accepted" if result.duplicate else "accepted",
                "accepted": len(activities),
                "batch_id": result.batch_id,
            },
            headers,
        )

    responses = {
        "200": {"description": "Accepted: the batch is durably in the broker.", "content": {"application/json": {"schema": SUCCESS_SCHEMA}}},
        **{
            str(code): {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for code, text in (
                (400, "Malformed JSON, gzip or header."),
                (401, "Missing or wrong API key."),
                (409, "Idempotency-Key reused with another body."),
                (413, "A limit was exceeded (body, activities, columns, value size, record depth)."),
                (415, "Content-Type is not application/json, or unsupported Content-Encoding."),
                (422, "At least one activity is invalid; every problem is listed with its path."),
                (503, "The broker cannot take the batch; retry after Retry-After seconds."),
            )
        },
    }
    async def ingest_direct(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await ingest(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.details, exc.headers)
        await response(scope, receive, send)

    app.fast_ingest = RequestContextMiddleware(ingest_direct, counted_paths=_INGEST_PATHS)

    for path, in_schema in ((INGEST_PATH, True), (INGEST_PATH.rstrip("/"), False)):
        app.add_api_route(
            path,
            ingest,
            methods=["POST"],
            include_in_schema=in_schema,
            summary="Ingest a batch of user activities",
            responses=responses,
            openapi_extra={
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
            },
        )

    @app.get("/healthz", summary="Alive")
    async def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/readyz", summary="Ready: the broker is reachable")
    async def readyz(request: Request) -> Response:
        ok, reason = await asyncio.to_thread(request.app.state.broker.ready)
        return _json(200 if ok else 503, {"ready": ok, "broker": reason})

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
