"""The API's Prometheus metrics, read back from a real `/metrics` scrape; request ids; readiness."""

from __future__ import annotations

import gzip
import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.broker import make_broker
from app.settings import Settings
from tests.support.brokers import StubBroker
from tests.support.processes import ROOT

README_BODY = json.loads((ROOT / "examples" / "readme.json").read_text())
PATH = "/api-log/v1/"


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, max_body_bytes=4096, max_activities=5, api_keys="k1")


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


AUTH = {"X-API-Key": "k1"}


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_response_path_is_counted_by_status(client):
    before = scrape(client)
    expected = {
        "200": [client.post(PATH, json=README_BODY, headers=AUTH), client.post(PATH.rstrip("/"), json=README_BODY, headers=AUTH)],
        "401": [client.post(PATH, json=README_BODY)],
        "415": [client.post(PATH, content=b"a=b", headers={**AUTH, "content-type": "text/plain"}),
                client.post(PATH, content=b"{}", headers={**AUTH, "content-type": "application/json", "content-encoding": "br"})],
        "413": [client.post(PATH, content=b"x" * 5000, headers={**AUTH, "content-type": "application/json"}),
                client.post(PATH, json={"user_activities": README_BODY["user_activities"] * 3}, headers=AUTH)],
        "400": [client.post(PATH, content=b"{nope", headers={**AUTH, "content-type": "application/json"})],
        "422": [client.post(PATH, json={"user_activities": [{"operation": "insert"}]}, headers=AUTH)],
        "405": [client.get(PATH)],
    }
    for status, responses in expected.items():
        assert [r.status_code for r in responses] == [int(status)] * len(responses), status
    after = scrape(client)
    for status, responses in expected.items():
        delta = value(after, "ingest_requests_total", status=status) - value(before, "ingest_requests_total", status=status)
        assert delta == len(responses), (status, delta)
    # Probes and scrapes are not ingest requests.
    client.get("/healthz")
    assert value(scrape(client), "ingest_requests_total", status="200") == value(after, "ingest_requests_total", status="200")


def test_accepted_rejected_publish_latency_and_backlog(client, settings):
    before = scrape(client)
    assert client.post(PATH, json=README_BODY, headers=AUTH).status_code == 200
    gz = gzip.compress(json.dumps(README_BODY).encode())
    assert client.post(PATH, content=gz, headers={**AUTH, "content-type": "application/json", "content-encoding": "gzip"}).status_code == 200
    bad = {"user_activities": [README_BODY["user_activities"][0], {**README_BODY["user_activities"][0], "col_values": ["x", 1, "a", None]}]}
    assert client.post(PATH, json=bad, headers=AUTH).status_code == 422
    too_many = {"user_activities": README_BODY["user_activities"] * 3}
    assert client.post(PATH, json=too_many, headers=AUTH).status_code == 413
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ingest_activities_accepted_total") == 4
    assert delta("ingest_activities_rejected_total") == 2 + 6
    assert delta("ingest_publish_seconds_count") == 2
    assert delta("ingest_publish_seconds_sum") > 0
    assert value(after, "ingest_publish_seconds_bucket", le="+Inf") >= 2
    # Backlog gauges are refreshed on scrape: two messages wait (nobody pulls).
    assert value(after, "broker_backlog_messages") == 2
    assert value(after, "broker_backlog_oldest_age_seconds") >= 0
    broker = make_broker(settings)
    try:
        broker.ack(broker.pull(100, 0.5))
    finally:
        broker.close()
    assert value(scrape(client), "broker_backlog_messages") == 0


def test_request_id_is_echoed_or_generated(client):
    r = client.post(PATH, json=README_BODY, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post(PATH, json=README_BODY)  # 401 carries it too
    assert r.status_code == 401 and len(r.headers["x-request-id"]) == 32
    for bad in ("bad id with spaces", "x" * 129, "<script>", b"caf\xc3\xa9"):
        r = client.get("/healthz", headers={"X-Request-ID": bad})
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"].isalnum(), bad


def test_unexpected_error_is_500_counted_with_request_id_and_readyz_says_why(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path), broker=StubBroker(publish_error=RuntimeError("boom"), ready=(False, "broker file missing: /nowhere/broker.sqlite"), backlog_error=RuntimeError("backlog unavailable")))) as c:
        before = scrape(c)  # a broken backlog does not break the scrape
        r = c.post(PATH, json=README_BODY, headers={"X-Request-ID": "req-500"})
        assert r.status_code == 500 and r.json()["error"] is True
        assert r.headers["x-request-id"] == "req-500"
        after = scrape(c)
        assert value(after, "ingest_requests_total", status="500") - value(before, "ingest_requests_total", status="500") == 1
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "broker": "broker file missing: /nowhere/broker.sqlite"}


def test_readyz_ok_with_local_broker(client):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "broker": "ok"}


def test_the_api_lists_only_its_own_metrics(client):
    names = {name for name, _ in scrape(client)}
    assert {"ingest_activities_accepted_total", "ingest_publish_seconds_count", "broker_backlog_messages",
            "process_resident_memory_bytes"} <= names
    assert not [n for n in names if n.startswith("pipeline_")], "the subscriber's metrics belong on its admin port"


def test_every_metric_belongs_to_exactly_one_process():
    from prometheus_client.metrics import MetricWrapperBase

    from app import metrics

    declared = {name: m for name, m in vars(metrics).items() if isinstance(m, MetricWrapperBase)}
    assert declared
    for name, metric in declared.items():
        owners = [r for r in (metrics.API, metrics.SUBSCRIBER) if metric in r._collector_to_names]
        assert len(owners) == 1, f"{name} must be registered with registry=API or registry=SUBSCRIBER"
