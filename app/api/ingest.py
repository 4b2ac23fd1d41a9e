"""`POST /api-log/v1/`: one request, step by step, from the raw body to the durable answer.

`IngestHandler.handle` runs the steps in order: admit (in-flight limit), authorize, check
headers, read the body (size limit, gzip), parse it exactly, validate, encode, publish,
answer. Each step raises `ApiError` for the caller's mistake or a refused publish;
`handle` turns it into the one error shape, so every route into the handler (the direct
dispatch in `app.api.app` and FastAPI's registered route) answers the same.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app import metrics
from app.api.auth import request_headers
from app.api.contracts import EdgeContracts
from app.api.errors import ApiError, error_response
from app.api.keys import KeyGate, unauthorized
from app.api.middleware import HEADERS_BY_NAME
from app.broker import BrokerUnavailable, IdempotencyConflict, OutgoingMessage, PublishResult
from app.heap import collector_paused
from app.logs import batch_id_var, trace_id_var
from app.messages.codec import SMALL_BATCH_ACTIVITIES, encode_runs, encode_small_batch, new_batch_id
from app.schema.columnar import ActivityRun
from app.schema.activity import Activity
from app.schema.columnar_validation import validate_runs
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from app.schema.values import loads_exact
from app.settings import Settings
from app.tracing import ingest_span, untraced_ingest

log = logging.getLogger("app.api")

INGEST_PATH = "/api-log/v1/"
RECEIPTS_PATH = INGEST_PATH + "batches/"  # GET RECEIPTS_PATH + batch id: app.api.receipts
MAX_IDEMPOTENCY_KEY_LENGTH = 255
RETRY_AFTER_SECONDS = "1"


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _activity_count(body: Any) -> int:
    activities = body.get("user_activities") if isinstance(body, dict) else None
    return len(activities) if isinstance(activities, list) else 0


def _is_small(validated: list[Activity] | list[ActivityRun]) -> bool:
    return bool(validated) and validated[0].__class__ is Activity


@dataclass(slots=True)
class PreparedBatch:
    """What a request publishes and answers, without the body it came from."""

    count: int  # activities accepted
    messages: list[OutgoingMessage]
    batch_id: str
    fingerprint: str | None  # of the body, when it came with an Idempotency-Key
    quarantined: tuple[tuple[str, int], ...]  # (table, activities) for the receipt
    answer_fields: dict[str, Any]  # what the contracts add to the answer


class IngestHandler:
    """Validates a batch at the edge, publishes it durably, answers (see the module docstring).

    `state` is the app's state: the broker is read from it per request, because the
    lifespan sets it after the handler is built.
    """

    def __init__(self, settings: Settings, keys: KeyGate, state: Any) -> None:
        self.keys = keys
        self.state = state
        self.contracts = EdgeContracts(state.tables_file, settings)  # tables under contract (app.api.contracts)
        self.in_flight = 0
        # Read once: the settings do not change while the app runs.
        self.max_in_flight = settings.max_in_flight_requests
        self.max_body_bytes = settings.max_body_bytes
        self.limits = {
            "max_activities": settings.max_activities,
            "max_columns": settings.max_columns,
            "max_value_bytes": settings.max_value_bytes,
            "max_record_depth": settings.max_record_depth,
        }

    async def handle(self, request: Request) -> Response:
        """The answer in the request's trace: the `ingest` span, its `traceparent` on the answer."""
        headers = request.scope.get(HEADERS_BY_NAME) or request_headers(request.scope)  # read by the middleware
        incoming = headers.get(b"traceparent")
        traceparent = untraced_ingest(incoming)  # the common case: no export, no span to open
        if traceparent is not None:
            response = await self.handle_in_trace(request, headers, traceparent)
        else:
            with ingest_span(incoming) as traceparent:
                response = await self.handle_in_trace(request, headers, traceparent)
        response.raw_headers.append((b"traceparent", traceparent.encode("latin-1")))
        return response

    async def handle_in_trace(self, request: Request, headers: dict[bytes, bytes], traceparent: str) -> Response:
        """The answer to one ingest request; every refusal in the one error shape."""
        trace_id_var.set(traceparent[3:35])  # the trace id (`tracing.trace_id_of`), on the request's log lines
        try:
            self.admit()
            self.in_flight += 1
            try:
                response = await self.ingest(request, headers, traceparent)
            finally:
                self.in_flight -= 1
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.details, exc.headers)
            if exc.key_id is not None:  # refused after the key was known: its count, and its id on the log line
                metrics.INGEST.count_key_request(exc.key_id, exc.status)
                request.scope["log_extra"] = {"key": exc.key_id}
        return response

    def admit(self) -> None:
        # Bounded work in progress: bodies are read into memory, so refuse new requests
        # beyond the limit instead of buffering without bound.
        limit = self.max_in_flight
        if self.in_flight >= limit:
            raise ApiError(
                503, f"too many requests in progress (limit {limit}); retry later",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )

    async def ingest(self, request: Request, headers: dict[bytes, bytes], traceparent: str) -> Response:
        if self.keys.enabled:  # `KeyGate.authenticate`, inlined: one call less per request
            key = self.keys.ring.authenticate_request(headers)
            if key is None:
                raise unauthorized()  # 401
        else:
            key = None
        try:  # costs nothing until something raises
            idempotency_key = self.checked_headers(headers)
            raw = await self.read_body(request, headers)
            with collector_paused():  # the body's objects are freed inside, uncollected (app.heap)
                batch = self.prepare(raw, key, idempotency_key, traceparent)
            count, messages, batch_id = batch.count, batch.messages, batch.batch_id
            key_id = None if key is None else key.id
            result, publish_seconds = await self.publish(count, messages, batch_id, idempotency_key, batch.fingerprint)
            # One INFO line per request: the middleware's `request finished` carries these.
            fields = {
                "activities": count, "messages": len(messages), "duplicate": result.duplicate,
                "publish_ms": round(publish_seconds * 1000, 2),
            }
            if key is not None:  # per-key metrics (`metrics.INGEST`: the label takes configured ids only)
                fields["key"] = key_id
                tally = key.tally
                tally.ok += 1
                if not result.duplicate:
                    tally.accepted += count
            request.scope["log_extra"] = fields
            if not result.duplicate:
                self.state.receipts.accepted(batch_id, key_id, messages, batch.quarantined)
            return self.answer(count, result, batch.answer_fields)
        except ApiError as exc:
            exc.key_id = None if key is None else key.id  # a refusal after the key was known names it
            raise

    def prepare(self, raw: bytes, key: Any, idempotency_key: str | None, traceparent: str) -> PreparedBatch:
        """Body -> messages to publish, or the refusal (an ApiError).

        Not a coroutine, so the parsed body and its columns are gone when it returns: kept
        alive by the requests waiting for their group commit, a 500-activity body's ~11,500
        objects were walked by every garbage collection meanwhile (issue 20).
        """
        body = self.parse(raw)
        validated = self.validate(body)
        count = len(validated) if _is_small(validated) else sum(map(len, validated))
        if key is not None:  # scope and rate cover every activity sent, quarantined ones too
            self.keys.authorize(key, body, validated, count)  # 403, 429
        # --- tables under contract: a 422, or what to publish and what the answer adds ---
        checked = self.contracts.check(body, validated)
        if checked.validated is not validated:
            validated = checked.validated
            count = len(validated) if _is_small(validated) else sum(map(len, validated))
        fingerprint = hashlib.sha256(raw).hexdigest() if idempotency_key is not None else None
        batch_id = new_batch_id(idempotency_key, fingerprint)  # another body, another batch id
        batch_id_var.set(batch_id)  # every later line of this request carries it (app.logs)
        key_id = None if key is None else key.id
        messages = self.encode(checked.to_publish(batch_id, key_id), batch_id)
        for message in messages:
            attributes = message.attributes
            attributes["traceparent"] = traceparent  # the apply joins the request's trace
            if key_id is not None:
                attributes["key_id"] = key_id  # the key id (never the secret) travels with the batch
        quarantined = checked.quarantined_by_table() if checked.quarantined else ()
        return PreparedBatch(count, messages, batch_id, fingerprint, quarantined, checked.answer_fields())

    @staticmethod
    def checked_headers(headers: dict[bytes, bytes]) -> str | None:
        """Checks Content-Type; returns the Idempotency-Key, if any."""
        content_type = headers.get(b"content-type", b"")
        if content_type != b"application/json" and (
            content_type.decode("latin-1").split(";", 1)[0].strip().lower() != "application/json"
        ):
            raise ApiError(415, "Content-Type must be application/json")
        idempotency_key = headers.get(b"idempotency-key")
        if idempotency_key is None:
            return None
        if not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH):
            raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        return idempotency_key.decode("latin-1")

    async def read_body(self, request: Request, headers: dict[bytes, bytes]) -> bytes:
        """The request body, gunzipped if needed, refusing more than the limit either way."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared.decode("latin-1")) > limit:
                    raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
            except ValueError:
                raise ApiError(400, "Content-Length is not a number") from None
        body = await self._received_body(request.receive, limit)
        encoding = headers.get(b"content-encoding")
        if encoding is None:
            return body
        encoding_name = encoding.decode("latin-1").strip().lower()
        if encoding_name in ("", "identity"):
            return body
        if encoding_name != "gzip":
            raise ApiError(415, f"Content-Encoding {encoding_name!r} is not supported; send identity or gzip")
        return self.gunzip(body, limit)

    @staticmethod
    async def _received_body(receive: Any, limit: int) -> bytes:
        # Straight from the ASGI messages, as Starlette's Request.stream() reads them.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
                if not message.get("more_body", False):
                    if not chunks:
                        return chunk
                    chunks.append(chunk)
                    return b"".join(chunks)
                chunks.append(chunk)
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()

    @staticmethod
    def gunzip(body: bytes, limit: int) -> bytes:
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

    @staticmethod
    def parse(raw: bytes) -> Any:
        try:
            return loads_exact(raw)  # numbers keep their exact value (a record's big integer too)
        except ValueError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None

    def validate(self, body: Any) -> list[Activity] | list[ActivityRun]:
        """Activities for a small request, runs (columns) otherwise; see SMALL_BATCH_ACTIVITIES."""
        try:
            if _activity_count(body) <= SMALL_BATCH_ACTIVITIES:
                return validate_batch(body, **self.limits)
            return validate_runs(body, **self.limits)
        except LimitExceeded as exc:
            metrics.ACTIVITIES_REJECTED.inc(_activity_count(body))
            raise ApiError(413, str(exc)) from None
        except BatchInvalid as exc:
            metrics.ACTIVITIES_REJECTED.inc(_activity_count(body))
            raise ApiError(422, f"batch rejected: {len(exc.details)} problem(s); nothing was published", exc.details) from None

    def encode(self, validated: list[Activity] | list[ActivityRun], batch_id: str) -> list[OutgoingMessage]:
        """Messages within the limits of the broker they are published to."""
        limits = self.state.broker.capabilities.message
        if _is_small(validated):
            return encode_small_batch(validated, batch_id, limits)  # type: ignore[arg-type]
        return encode_runs(validated, batch_id, limits)  # type: ignore[arg-type]

    async def publish(
        self,
        count: int,
        messages: list[OutgoingMessage],
        batch_id: str,
        idempotency_key: str | None,
        fingerprint: str | None,
    ) -> tuple[PublishResult, float]:
        """Publishes `count` activities durably; returns the broker's result and the seconds it took."""
        started = time.perf_counter()
        try:
            result = await self.state.broker.publish(
                messages, batch_id=batch_id, idempotency_key=idempotency_key, request_fingerprint=fingerprint
            )
        except IdempotencyConflict:
            metrics.ACTIVITIES_REJECTED.inc(count)
            raise ApiError(409, "Idempotency-Key was already used with a different body") from None
        except BrokerUnavailable as exc:
            log.warning("broker unavailable: %s", exc)
            raise ApiError(503, unavailable_message(exc), headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        publish_seconds = time.perf_counter() - started
        tallies = metrics.INGEST
        tallies.observe_publish(publish_seconds)
        if not result.duplicate:
            tallies.activities_accepted += count
            self.state.event_rate.record(count)  # the status page's chart
        return result, publish_seconds

    @staticmethod
    def answer(accepted: int, result: PublishResult, contract_fields: dict[str, Any] | None = None) -> Response:
        return json_response(
            200,
            {
                "error": False,
                "message": "already accepted" if result.duplicate else "accepted",
                "accepted": accepted,
                "batch_id": result.batch_id,
                "receipt": RECEIPTS_PATH + result.batch_id,
                **(contract_fields or {}),
            },
            {"Idempotent-Replayed": "true"} if result.duplicate else None,
        )


def unavailable_message(exc: BrokerUnavailable) -> str:
    """The 503's message: honest about a publish whose outcome the broker did not confirm."""
    if exc.maybe_published:
        return (
            "the stream did not confirm the batch in time: it may have been accepted. Retry with the "
            "same Idempotency-Key header (and the same body): a retry with it is applied once"
        )
    return "the stream cannot take the batch right now; nothing was accepted, retry later"
