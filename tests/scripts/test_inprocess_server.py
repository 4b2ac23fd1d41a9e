"""`api_inprocess --server` sends whole requests through uvicorn's protocol to the real app."""

from __future__ import annotations

import asyncio

from app.api.app import create_app
from app.keys import new_key, write_keys_file
from app.settings import Settings
from scripts.bench import workload
from scripts.bench.inprocess_server import ServedConnection, raw_request
from tests.support.brokers import StubBroker


def _answers(app, requests: list[bytes]) -> list[bytes]:
    async def run() -> list[bytes]:
        async with app.router.lifespan_context(app):
            connection = ServedConnection(app)  # one keep-alive connection for all of them
            return [await connection.request(raw) for raw in requests]

    return asyncio.run(run())


def test_requests_are_parsed_served_and_answered_by_the_server_on_one_connection(tmp_path):
    key, secret = new_key("bench", ["user_activities*"], ["insert"])
    write_keys_file(tmp_path / "keys.toml", [key])
    app = create_app(Settings(data_dir=tmp_path, api_keys_file=tmp_path / "keys.toml"), broker=StubBroker())
    body = workload.readme_body()
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    keyed = headers + [(b"authorization", f"Bearer {secret}".encode())]
    assert _answers(app, [
        raw_request("/api-log/v1/", keyed, body),
        raw_request("/api-log/v1/", headers, body),  # no key
        raw_request("/api-log/v1/", [*keyed[:1], (b"content-type", b"text/plain"), *keyed[2:]], body),
        raw_request("/api-log/v1/", keyed, body),
    ]) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 415 Unsupported Media Type", b"HTTP/1.1 200 OK"]
