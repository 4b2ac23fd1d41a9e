"""Trace context without an exporter: traceparent parsed or started fresh, answered, carried to the messages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app import tracing
from app.api.app import create_app
from app.settings import Settings
from tests.support.memory_broker import MemoryBroker

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BODY = {"user_activities": [
    {"operation": "insert", "table": "t", "col_names": ["id"], "col_types": ["integer"], "col_values": [1]}
]}


@pytest.mark.parametrize(
    "header, valid",
    [(PARENT, True), (PARENT.encode(), True), (PARENT.upper(), False), ("01" + PARENT[2:], False),
     ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False), ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", False),
     ("garbage", False), (None, False), (" \t" + PARENT + " ", True), (PARENT[:34] + "-" + PARENT[34] + PARENT[36:], False),
     (PARENT[:-1] + "\u00e9", False), (PARENT[:-1] + " ", False), (PARENT + "-00", False), (PARENT.replace("-", "_"), False)],
)
def test_parse_accepts_only_a_valid_version_00_traceparent(header, valid):
    parsed = tracing.parse(header)
    assert (parsed is not None) is valid
    if valid:
        assert parsed.header == PARENT and tracing.parse(parsed.header) == parsed


def test_without_an_exporter_the_caller_trace_continues_or_a_fresh_one_starts():
    with tracing.ingest_span(PARENT) as header:
        span = tracing.parse(header)
        assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and span.flags == "01"
        assert span.span_id != "00f067aa0ba902b7" and len(span.span_id) == 16
        assert tracing.trace_id_of(header) == span.trace_id
    with tracing.ingest_span("not a traceparent") as fresh_header, tracing.ingest_span(None) as other:
        fresh = tracing.parse(fresh_header)
        assert fresh is not None and fresh.header == fresh_header and fresh.trace_id != tracing.parse(other).trace_id
    with tracing.apply_spans([("t", [PARENT])]):
        pass  # nothing to export: a no-op
    assert tracing.trace_ids([PARENT, PARENT, None, fresh_header]) == f"{span.trace_id},{fresh.trace_id}"


@pytest.mark.parametrize("header", [PARENT.encode(), b" " + PARENT.encode() + b"\t", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
                                    PARENT.upper().encode(), b"garbage", None])
def test_the_untraced_path_continues_only_a_valid_caller_trace(header):
    made = tracing.parse(tracing.untraced_ingest(header))
    assert made is not None and made.span_id != "00f067aa0ba902b7"
    continues = header is not None and tracing.parse(header) is not None
    assert (made.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736") is continues
    assert made.flags == ("01" if continues else "00")


def test_the_answer_and_every_message_carry_the_ingest_traceparent(tmp_path):
    broker = MemoryBroker()
    with TestClient(create_app(Settings(data_dir=tmp_path), broker=broker)) as client:
        r = client.post("/api-log/v1/", json=BODY, headers={"traceparent": PARENT})
        refused = client.post("/api-log/v1/", json={"user_activities": []})
    assert r.status_code == 200, r.text
    answered = tracing.parse(r.headers["traceparent"])
    assert answered.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    [message] = broker.pull(10, 0)
    assert message.attributes["traceparent"] == answered.header
    assert tracing.parse(refused.headers["traceparent"]) is not None  # refusals are answered in a trace too
