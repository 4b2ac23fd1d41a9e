"""The ingest handler answers the same through the direct dispatch and FastAPI's route.

`IngestApp` sends `POST /api-log/v1/` straight to `IngestHandler.handle`; with the
direct dispatch switched off the request takes FastAPI's registered route to the same
handler. Every answer (status, body, the headers that matter, the request id) must be
the same either way, for acceptance and for each kind of refusal.
"""

from __future__ import annotations

import gzip
import json

import orjson
import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.support.processes import ROOT

README_BODY = json.loads((ROOT / "examples" / "readme.json").read_text())
PATH = "/api-log/v1/"
JSON = {"content-type": "application/json"}
AUTH = {"X-API-Key": "k1"}
GOOD = orjson.dumps(README_BODY)

REQUESTS = [  # (content, headers)
    (GOOD, {**JSON, **AUTH}),
    (GOOD, JSON),  # no key: 401
    (GOOD, {**JSON, "X-API-Key": "wrong"}),
    (GOOD, {"content-type": "text/plain", **AUTH}),
    (b"{oops", {**JSON, **AUTH}),
    (b"[]", {**JSON, **AUTH}),
    (orjson.dumps({"user_activities": [dict(README_BODY["user_activities"][0], col_values=[1, "two", "x", None])]}),
     {**JSON, **AUTH}),
    (orjson.dumps({"user_activities": README_BODY["user_activities"] * 3}), {**JSON, **AUTH}),  # 6 > 5 activities
    (b"x" * 5000, {**JSON, **AUTH}),  # over the body limit
    (gzip.compress(GOOD), {**JSON, **AUTH, "content-encoding": "gzip"}),
    (GOOD, {**JSON, **AUTH, "content-encoding": "br"}),
    (GOOD, {**JSON, **AUTH, "Idempotency-Key": "k-1"}),
    (GOOD, {**JSON, **AUTH, "Idempotency-Key": "k-1"}),  # replay
    (GOOD.replace(b"logged in", b"logged on"), {**JSON, **AUTH, "Idempotency-Key": "k-1"}),  # 409
    (GOOD, {**JSON, **AUTH, "Idempotency-Key": "x" * 256}),
    (GOOD, {**JSON, **AUTH, "X-Request-ID": "caller-id-1"}),
]
KEPT_HEADERS = ("content-type", "retry-after", "www-authenticate", "idempotent-replayed")


def _answers(tmp_path, direct: bool) -> list[tuple]:
    settings = Settings(data_dir=tmp_path, max_body_bytes=4096, max_activities=5, api_keys="k1")
    app = create_app(settings)
    if not direct:
        app.fast_ingest = None  # every request takes FastAPI's route
    answers = []
    with TestClient(app) as client:
        for content, headers in REQUESTS:
            r = client.post(PATH, content=content, headers=headers)
            body = r.json()
            batch_id = body.pop("batch_id", None)
            if batch_id is not None:
                assert body.pop("receipt") == f"{PATH}batches/{batch_id}"
            answers.append((
                r.status_code,
                body,
                {h: r.headers.get(h) for h in KEPT_HEADERS},
                r.headers["x-request-id"] if "X-Request-ID" in headers else len(r.headers["x-request-id"]),
                batch_id if "Idempotency-Key" in headers else batch_id is not None,
            ))
    return answers


def test_direct_dispatch_and_fastapi_route_answer_the_same(tmp_path):
    direct = _answers(tmp_path / "direct", direct=True)
    routed = _answers(tmp_path / "routed", direct=False)
    assert direct == routed
    statuses = [a[0] for a in direct]
    assert statuses == [200, 401, 401, 415, 400, 422, 422, 413, 413, 200, 415, 200, 200, 409, 400, 200]
    assert direct[1][2]["www-authenticate"] == "Bearer"
    assert direct[12][1]["message"] == "already accepted" and direct[12][2]["idempotent-replayed"] == "true"
    assert direct[12][4] == direct[11][4]  # the replay answers with the first batch id
    assert direct[15][3] == "caller-id-1"
    assert all(a[1]["error"] is True and isinstance(a[1]["details"], list) for a in direct if a[0] != 200)


@pytest.mark.parametrize("direct", [True, False])
def test_a_bug_in_a_step_is_a_500_in_the_error_shape_and_the_next_request_is_admitted(tmp_path, direct, monkeypatch):
    from app.api import ingest

    settings = Settings(data_dir=tmp_path, max_in_flight_requests=1)
    app = create_app(settings)
    if not direct:
        app.fast_ingest = None

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(ingest, "encode_small_batch", broken)  # the README body is a small batch
        r = client.post(PATH, json=README_BODY)
        assert r.status_code == 500 and r.json()["error"] is True and r.headers["x-request-id"]
        monkeypatch.undo()
        assert client.post(PATH, json=README_BODY).status_code == 200  # the in-flight slot was given back


def _asgi_post(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """One POST straight through the ASGI interface, its body sent in `chunks` (no Content-Length)."""
    import asyncio

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        async with app.router.lifespan_context(app):
            scope = {"type": "http", "method": "POST", "path": PATH, "root_path": "", "query_string": b"",
                     "headers": headers, "http_version": "1.1", "scheme": "http", "client": ("t", 1), "server": ("t", 80)}
            await app(scope, receive, send)

    asyncio.run(run())
    return sent[0]["status"], orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.mark.parametrize("direct", [True, False])
def test_a_body_in_many_chunks_is_read_whole_and_limited_as_it_arrives(tmp_path, direct):
    app = create_app(Settings(data_dir=tmp_path, max_body_bytes=4096))
    if not direct:
        app.fast_ingest = None
    headers = [(b"content-type", b"application/json")]
    pieces = [GOOD[i:i + 7] for i in range(0, len(GOOD), 7)]
    status, body = _asgi_post(app, pieces, headers)
    assert status == 200 and body["accepted"] == 2
    status, body = _asgi_post(app, [b" " * 1000] * 5 + [GOOD], headers)  # 5,000 bytes of whitespace first
    assert status == 413 and "4096" in body["message"]


@pytest.mark.parametrize("direct", [True, False])
def test_repeated_header_the_first_counts_as_in_starlette(tmp_path, direct):
    app = create_app(Settings(data_dir=tmp_path))
    if not direct:
        app.fast_ingest = None
    status, _ = _asgi_post(app, [GOOD], [(b"content-type", b"application/json"), (b"content-type", b"text/plain")])
    assert status == 200
    status, _ = _asgi_post(app, [GOOD], [(b"content-type", b"text/plain"), (b"content-type", b"application/json")])
    assert status == 415


@pytest.mark.parametrize("activities", [2, 40])  # a small batch, and one validated as columns
def test_the_parsed_body_is_let_go_before_the_publish_wait(tmp_path, monkeypatch, activities):
    """Requests waiting for their group commit hold no parsed bodies: the garbage collector
    would walk every object of every waiting body (issue 20: ~40% of a 500-activity request)."""
    import gc

    from app.api.ingest import IngestHandler
    from tests.support.brokers import StubBroker

    kept: list = []  # the parsed body and the validated activities, and nothing else refers to them
    parse, validate = IngestHandler.parse, IngestHandler.validate
    monkeypatch.setattr(IngestHandler, "parse", staticmethod(lambda raw: kept.append(parse(raw)) or kept[-1]))
    monkeypatch.setattr(IngestHandler, "validate", lambda self, body: kept.append(validate(self, body)) or kept[-1])
    holders: list[list] = []

    class WatchingBroker(StubBroker):
        async def publish(self, messages, **kwargs):
            holders.extend([r for r in gc.get_referrers(obj) if r is not kept] for obj in kept)
            return await super().publish(messages, **kwargs)

    activity = README_BODY["user_activities"][0]
    body = {"user_activities": [activity] * activities}
    with TestClient(create_app(Settings(data_dir=tmp_path), broker=WatchingBroker())) as client:
        assert client.post(PATH, json=body).status_code == 200
    assert len(holders) == 2 and holders == [[], []]


def test_the_body_is_parsed_and_validated_with_the_collector_paused_and_it_runs_again_after(tmp_path, monkeypatch):
    import gc

    from app.api.ingest import IngestHandler

    seen: list[bool] = []
    parse = IngestHandler.parse
    monkeypatch.setattr(IngestHandler, "parse", staticmethod(lambda raw: seen.append(gc.isenabled()) or parse(raw)))
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        assert client.post(PATH, json=README_BODY).status_code == 200
        assert client.post(PATH, content=b"{oops", headers=JSON).status_code == 400  # refused inside
        assert seen == [False, False] and gc.isenabled()
