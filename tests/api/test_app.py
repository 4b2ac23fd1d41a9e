"""The API edge: contract, limits and error shapes, over the ASGI app with a real local broker."""

from __future__ import annotations

import gzip
import json

import orjson
import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.broker import BrokerUnavailable, make_broker
from app.messages.codec import decode_message
from app.settings import Settings
from tests.support.brokers import StubBroker
from tests.support.processes import ROOT

README_BODY = json.loads((ROOT / "examples" / "readme.json").read_text())
PATH = "/api-log/v1/"


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, max_body_bytes=64 * 1024, max_activities=50)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _pulled(settings):
    broker = make_broker(settings)
    try:
        return broker.pull(1000, 0.2)
    finally:
        broker.close()


def test_accepts_readme_example_and_publishes_one_message_per_table(client, settings):
    r = client.post(PATH, json=README_BODY)
    assert r.status_code == 200
    body = r.json()
    assert body == {"error": False, "message": "accepted", "accepted": 2, "batch_id": body["batch_id"],
                    "receipt": f"/api-log/v1/batches/{body['batch_id']}"}
    messages = _pulled(settings)
    assert len(messages) == 1
    m = messages[0]
    assert m.ordering_key == "user_activities_table"
    assert m.attributes["count"] == "2" and m.attributes["batch_id"] == body["batch_id"]
    envelope = decode_message(m)
    assert envelope.dedup_id == f"{body['batch_id']}:user_activities_table:0"
    assert [a.col_values for a in envelope.activities] == [
        [1, 2, "logged in", "2021-03-30T06:12:44"],
        [2, 5, "changed password", "2021-03-30T06:14:02"],
    ]


@pytest.mark.parametrize("count, columnar", [(8, False), (9, True)])
def test_small_requests_publish_json_and_larger_ones_arrow_with_the_same_activities(client, settings, count, columnar):
    # SMALL_BATCH_ACTIVITIES: per-value validation and format 1 below it, columns and format 2 above
    one = README_BODY["user_activities"][0]
    acts = [{**one, "col_values": [i, 2, f"event {i}", "2021-3-30 6:12:44"]} for i in range(count)]
    assert client.post(PATH, json={"user_activities": acts}).status_code == 200
    [m] = _pulled(settings)
    envelope = decode_message(m)
    assert (envelope.runs is not None) is columnar
    assert m.data.startswith(b"ACTV") is columnar
    assert [a.col_values for a in envelope.activities] == [[i, 2, f"event {i}", "2021-03-30T06:12:44"] for i in range(count)]


def test_without_trailing_slash(client):
    assert client.post(PATH.rstrip("/"), json=README_BODY).status_code == 200


def test_invalid_activity_rejects_whole_batch_with_paths(client, settings):
    good = README_BODY["user_activities"][0]
    bad = dict(good, col_values=[1, "two", "x", "2021-13-01 00:00:00"])
    r = client.post(PATH, json={"user_activities": [good, good, good, bad]})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] is True
    locs = {d["loc"] for d in body["details"]}
    assert {"user_activities[3].col_values[1]", "user_activities[3].col_values[3]"} <= locs
    assert _pulled(settings) == []


@pytest.mark.parametrize("column", ["_CHANGE_TYPE", "_change_sequence_number", "_Change_Timestamp"])
def test_bigquery_change_data_capture_columns_are_refused_at_the_edge(client, settings, column):
    good = README_BODY["user_activities"][0]
    bad = dict(good, col_names=[*good["col_names"][:-1], column])
    r = client.post(PATH, json={"user_activities": [good, bad]})
    assert r.status_code == 422
    [detail] = r.json()["details"]
    assert detail["loc"] == f"user_activities[1].col_names[{len(good['col_names']) - 1}]"
    assert f"reserved prefix '{column.upper()}'" in detail["message"]
    assert _pulled(settings) == []


@pytest.mark.parametrize(
    "content, headers, status",
    [
        (b"{oops", {"content-type": "application/json"}, 400),
        (b"[]", {"content-type": "application/json"}, 422),
        (b'{"user_activities": []}', {"content-type": "application/json"}, 422),
        (b"user_activities=1", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b"{}", {}, 415),
        (b"\xff\xfe", {"content-type": "application/json"}, 400),
    ],
)
def test_malformed_requests_get_4xx_in_error_shape(client, content, headers, status):
    r = client.post(PATH, content=content, headers=headers)
    assert r.status_code == status
    assert r.json()["error"] is True and isinstance(r.json()["details"], list)


def test_body_limit_is_413(client, settings):
    big = {"user_activities": [dict(README_BODY["user_activities"][0], col_values=[1, 2, "x" * 70_000, None])]}
    r = client.post(PATH, json=big)
    assert r.status_code == 413 and str(settings.max_body_bytes) in r.json()["message"]


def test_activity_count_limit_is_413(client):
    r = client.post(PATH, json={"user_activities": README_BODY["user_activities"] * 26})
    assert r.status_code == 413 and "50" in r.json()["message"]


def test_gzip_body_accepted_and_bomb_refused(client, settings):
    r = client.post(PATH, content=gzip.compress(orjson.dumps(README_BODY)),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 200
    bomb = gzip.compress(b" " * (settings.max_body_bytes * 4))
    assert len(bomb) < settings.max_body_bytes
    r = client.post(PATH, content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413
    r = client.post(PATH, content=b"not gzip", headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 400
    r = client.post(PATH, content=b"{}", headers={"content-type": "application/json", "content-encoding": "br"})
    assert r.status_code == 415


@pytest.mark.parametrize("maybe_published", [False, True])
def test_the_503_says_whether_the_batch_may_have_been_accepted(settings, maybe_published):
    error = BrokerUnavailable("no answer in time", maybe_published=maybe_published)
    with TestClient(create_app(settings, broker=StubBroker(publish_error=error))) as c:
        r = c.post(PATH, json=README_BODY, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    message = r.json()["message"]
    if maybe_published:
        assert "may have been accepted" in message and "same Idempotency-Key" in message
    else:
        assert "nothing was accepted" in message


def test_broker_unavailable_is_503_with_retry_after(settings):
    with TestClient(create_app(settings, broker=StubBroker(publish_error=BrokerUnavailable("disk full"), ready=(False, "disk full")))) as c:
        r = c.post(PATH, json=README_BODY)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"] is True
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "broker": "disk full"}


def test_idempotency_key(client, settings):
    h = {"Idempotency-Key": "abc"}
    a = client.post(PATH, json=README_BODY, headers=h)
    b = client.post(PATH, json=README_BODY, headers=h)
    assert a.status_code == b.status_code == 200
    assert a.json()["batch_id"] == b.json()["batch_id"] and b.headers["idempotent-replayed"] == "true"
    assert len(_pulled(settings)) == 1
    other = dict(README_BODY["user_activities"][0], col_values=[9, 9, "other", None])
    assert client.post(PATH, json={"user_activities": [other]}, headers=h).status_code == 409
    assert client.post(PATH, json=README_BODY, headers={"Idempotency-Key": ""}).status_code == 400


def test_openapi_documents_contract(client):
    schema = client.get("/openapi.json").json()
    op = schema["paths"][PATH]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/IngestRequest"}
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])
    assert "IngestRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_requests_beyond_the_in_flight_limit_get_503(tmp_path):
    import asyncio

    import httpx

    app = create_app(Settings(data_dir=tmp_path, max_in_flight_requests=2), broker=StubBroker(publish_delay=0.3))

    async def burst():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await asyncio.gather(*(client.post(PATH, json=README_BODY) for _ in range(5)))

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    assert statuses == [200, 200, 503, 503, 503]
