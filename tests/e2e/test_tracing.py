"""One trace from POST to apply across the two real processes, exported over OTLP.

An in-process OTLP receiver collects what the API and the subscriber export. The
caller's `traceparent` is the parent of the API's `ingest` span, which is the parent
of (and linked from) the subscriber's `apply` span; both processes log the trace id.
Run on the local broker, and on Pub/Sub (pstest, marked `emulator`).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid

import pytest

from tests.support.otlp_receiver import otlp_receiver
from tests.support.processes import ROOT, Pipeline, wait_until
from tests.support.pstest import running_pstest

CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
BODY = {"user_activities": [
    {"operation": "insert", "table": "traced", "col_names": ["id"], "col_types": ["integer"], "col_values": [1]}
]}


@pytest.fixture(params=["local", pytest.param("pubsub", marks=pytest.mark.emulator)])
def traced(tmp_path, request):
    with otlp_receiver() as (endpoint, receiver), _broker_env(request.param) as env:
        p = Pipeline.create(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="50", **env)
        if request.param == "pubsub":  # the same script users run, against the emulator
            out = subprocess.run(["bash", str(ROOT / "pubsub.sh")], cwd=ROOT, env=p.env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
        p.start("subscriber")
        p.start("api")
        yield p, receiver
        p.stop()


@contextlib.contextmanager
def _broker_env(broker: str):
    if broker == "local":
        yield {}
        return
    suffix = uuid.uuid4().hex[:8]
    with running_pstest() as host:
        yield {"BROKER": "pubsub", "PUBSUB_EMULATOR_HOST": host, "PUBSUB_TOPIC": f"traced-{suffix}",
               "PUBSUB_SUBSCRIPTION": f"traced-sub-{suffix}", "GCP_PROJECT": "e2e-project", "PROVISION_BIGQUERY": "false"}


def _trace_ids_logged(pipeline: Pipeline, which: str) -> set[str]:
    lines = (pipeline.log_dir / f"{which}.log").read_text().splitlines()
    return {event["trace_id"] for event in map(json.loads, lines) if "trace_id" in event}


def test_one_trace_spans_post_to_apply(traced):
    pipeline, receiver = traced
    r = pipeline.post(BODY, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert r.status_code == 200, r.text
    version, trace_id, ingest_span_id, flags = r.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01")

    def apply_in_trace():
        return [s for s in receiver.named("apply") if s.trace_id == CALLER_TRACE]

    [apply] = wait_until(apply_in_trace, what="the subscriber's apply span")
    [ingest] = wait_until(lambda: [s for s in receiver.named("ingest") if s.trace_id == CALLER_TRACE], what="ingest span")
    assert (ingest.service, ingest.span_id, ingest.parent_span_id) == ("ingest-api", ingest_span_id, CALLER_SPAN)
    assert (apply.service, apply.parent_span_id) == ("ingest-subscriber", ingest_span_id)
    assert apply.links == ((CALLER_TRACE, ingest_span_id),)
    pipeline.stop()  # the log files are complete
    assert CALLER_TRACE in _trace_ids_logged(pipeline, "api")
    assert CALLER_TRACE in _trace_ids_logged(pipeline, "subscriber")


def test_a_request_without_traceparent_starts_a_fresh_trace(traced):
    pipeline, receiver = traced
    r = pipeline.post(BODY)
    assert r.status_code == 200, r.text
    _, trace_id, span_id, _ = r.headers["traceparent"].split("-")
    [ingest] = wait_until(lambda: [s for s in receiver.named("ingest") if s.trace_id == trace_id], what="ingest span")
    assert ingest.span_id == span_id and ingest.parent_span_id == ""
    wait_until(lambda: [s for s in receiver.named("apply") if s.trace_id == trace_id], what="apply span")
