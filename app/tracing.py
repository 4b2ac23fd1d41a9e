"""Trace context from POST to apply: W3C `traceparent`, OpenTelemetry spans, OTLP export.

- The API reads a request's `traceparent` (or starts a fresh trace), runs the `ingest`
  span in it, answers with the span's own `traceparent` header and stamps it on every
  message as the `traceparent` attribute.
- The subscriber runs one `apply` span per table it applies (plan, warehouse write, ack),
  a child of the first message's `ingest` span and linked to every message's.
- Spans are exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; else
  no tracer exists, and a request pays for parsing a header and drawing random ids.
"""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Iterator, NamedTuple, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

# A version-00 header, `00-<32 hex>-<16 hex>-<2 hex>` in lower case, checked without a regex:
# `translate` turns each lower-case hex digit into "x" (and any other byte but "-" into "?"),
# so one comparison with its shape checks every position.
_SHAPE_TABLE = bytes(ord("x") if chr(b) in "0123456789abcdef" else b if b == ord("-") else ord("?") for b in range(256))
_SHAPE = b"xx-" + b"x" * 32 + b"-" + b"x" * 16 + b"-xx"
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
ATTRIBUTE = "traceparent"  # the message attribute, named as the header

_tracer: trace.Tracer | None = None
_provider = None  # the SDK's TracerProvider, when exporting
_configured = threading.Lock()


def configure(service_name: str, endpoint: str | None) -> None:
    """Export spans over OTLP/HTTP to `endpoint` (base URL); without one, trace nothing."""
    global _tracer, _provider
    if not endpoint:
        return
    with _configured:
        if _tracer is not None:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
        _tracer = _provider.get_tracer("app")


def shutdown() -> None:
    """Exports the spans not sent yet (on a clean stop) and stops tracing."""
    global _tracer, _provider
    with _configured:
        if _provider is not None:
            _provider.shutdown()
        _tracer = _provider = None


class TraceParent(NamedTuple):  # a tuple: cheaper to make than a frozen dataclass, per request
    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16
    flags: str  # 2

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def span_context(self) -> SpanContext:
        return SpanContext(int(self.trace_id, 16), int(self.span_id, 16), is_remote=True,
                           trace_flags=TraceFlags(int(self.flags, 16)))


def checked(value: bytes) -> bytes | None:
    """`value` without the optional white space around it if it is a valid version-00
    `traceparent` (ids not all zeros), else None."""
    if len(value) != 55:
        value = value.strip(b" \t")
    if value.translate(_SHAPE_TABLE) == _SHAPE and value[:2] == b"00" and value[3:35] != _ZERO_TRACE and value[36:52] != _ZERO_SPAN:
        return value
    return None


def parse(value: str | bytes | None) -> TraceParent | None:
    """A valid version-00 `traceparent`, else None (then a fresh trace starts, as the spec says)."""
    if value is None:
        return None
    if value.__class__ is not bytes:
        value = value.encode("latin-1", "replace")  # type: ignore[union-attr]  # any other character: not valid
    valid = checked(value)  # type: ignore[arg-type]
    if valid is None:
        return None
    text = valid.decode("ascii")
    return TraceParent(text[3:35], text[36:52], text[53:])


def _of(span_context: SpanContext) -> TraceParent:
    return TraceParent(format(span_context.trace_id, "032x"), format(span_context.span_id, "016x"),
                       format(span_context.trace_flags, "02x"))


_SPAN_BITS = (1 << 64) - 1


def untraced_ingest(incoming: bytes | None) -> str | None:
    """Without export, the request's own `traceparent`, at the cost of checking a header
    and drawing random bits (no span, no objects); None when exporting (use `ingest_span`).

    Written flat on purpose: it runs on every request, where each call costs."""
    if _tracer is not None:
        return None
    # Ids need to be unique, not secret: the SDK draws them the same way.
    if incoming is not None:
        valid = checked(incoming)
        if valid is not None:  # the caller's trace continues: its trace id and flags, our span id
            return f"{valid[:36].decode()}{random.getrandbits(64):016x}{valid[52:].decode()}"
    ids = random.getrandbits(192)  # a fresh trace: trace id and span id in one draw
    return f"00-{ids >> 64:032x}-{ids & _SPAN_BITS:016x}-00"


def trace_id_of(header: str) -> str:
    """The trace id of a header made by `untraced_ingest` or `ingest_span`."""
    return header[3:35]


@contextlib.contextmanager
def ingest_span(incoming: str | bytes | None) -> Iterator[str]:
    """The `ingest` span in the caller's trace (or a fresh one); yields its own `traceparent`."""
    if _tracer is None:
        yield untraced_ingest(incoming.encode("latin-1", "replace") if isinstance(incoming, str) else incoming)  # type: ignore[misc]
        return
    parent = parse(incoming)
    ctx = trace.set_span_in_context(NonRecordingSpan(parent.span_context())) if parent else otel_context.Context()
    with _tracer.start_as_current_span("ingest", context=ctx, kind=SpanKind.SERVER) as span:
        yield _of(span.get_span_context()).header


@contextlib.contextmanager
def apply_spans(tables: Sequence[tuple[str, Sequence[str | None]]]) -> Iterator[None]:
    """One `apply` span per (table, its messages' traceparents) for the block's duration."""
    if _tracer is None:
        yield
        return
    spans = []
    for table, headers in tables:
        parents = [p for p in map(parse, headers) if p is not None]
        ctx = trace.set_span_in_context(NonRecordingSpan(parents[0].span_context())) if parents else otel_context.Context()
        links = [Link(p.span_context()) for p in dict.fromkeys(parents)]
        spans.append(_tracer.start_span("apply", context=ctx, links=links, kind=SpanKind.CONSUMER,
                                        attributes={"table": table, "messages": len(headers)}))
    try:
        yield
    finally:
        for span in spans:
            span.end()


def trace_ids(headers: Sequence[str | None]) -> str | None:
    """The distinct trace ids of messages' traceparents, comma-separated (for log lines)."""
    ids = dict.fromkeys(p.trace_id for p in map(parse, headers) if p is not None)
    return ",".join(ids) or None
