"""Scoped keys at the edge: 401/403/429, expiry, rotation, revocation, and the key id carried along.

The app's key ring and rate limiter run on clocks the tests move, so reloads and
refills happen when a test says so, not after real waiting.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.keys import new_key, write_keys_file
from app.keys.entries import digest_of, revoked
from app.keys.ring import CHECK_EVERY_SECONDS
from app.settings import Settings
from tests.api.test_metrics import scrape, value
from tests.support.memory_broker import MemoryBroker

PATH = "/api-log/v1/"


def _activity(table: str, operation: str = "insert", n: int = 1) -> dict:
    return {"operation": operation, "table": table, "col_names": ["id"], "col_types": ["integer"], "col_values": [n]}


def _body(*activities: dict) -> dict:
    return {"user_activities": list(activities)}


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()  # the app's ring last looked at the file on the real clock

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path):
    orders, orders_secret = new_key("orders-backend", ["orders*"], ["insert"])
    limited, limited_secret = new_key("limited", ["*"], ["insert", "delete"], rate=10, burst=20)
    expired, expired_secret = new_key("expired", ["*"], ["insert"], expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    path = tmp_path / "keys.toml"
    write_keys_file(path, [orders, limited, expired])
    secrets = {"orders-backend": orders_secret, "limited": limited_secret, "expired": expired_secret}
    return path, [orders, limited, expired], secrets


@pytest.fixture
def app_parts(tmp_path, keys):
    path, _, _ = keys
    settings = Settings(data_dir=tmp_path, api_keys="env-secret", api_keys_file=path)
    broker = MemoryBroker(settings)
    app = create_app(settings, broker=broker)
    clock = Clock()
    app.state.keys.ring.clock = clock
    app.state.keys.limiter.clock = clock
    with TestClient(app) as client:
        yield client, broker, clock


def _post(client, secret: str | None, body: dict, **headers):
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    return client.post(PATH, json=body, headers=headers)


def test_unknown_expired_and_missing_keys_answer_401(app_parts, keys):
    client, broker, _ = app_parts
    _, _, secrets = keys
    for secret in (None, "not-a-key", secrets["expired"], digest_of(secrets["orders-backend"]).hex()):
        r = _post(client, secret, _body(_activity("orders")))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert broker.pull(10, 0) == []


def test_api_keys_still_work_with_every_scope(app_parts):
    client, broker, _ = app_parts
    r = _post(client, "env-secret", _body(_activity("anything"), _activity("anything", "delete")))
    assert r.status_code == 200, r.text
    [message] = broker.pull(10, 0)
    assert message.attributes["key_id"] == "env-1"


@pytest.mark.parametrize("small", [True, False])  # per-activity and columnar validation
def test_an_activity_outside_the_scope_answers_403_naming_it_and_nothing_is_published(app_parts, keys, small):
    client, broker, _ = app_parts
    _, _, secrets = keys
    padding = [_activity("orders", n=i) for i in range(2 if small else 20)]
    for bad, problem in ((_activity("users"), ("users", "insert")), (_activity("orders_eu", "delete"), ("orders_eu", "delete"))):
        r = _post(client, secrets["orders-backend"], _body(*padding, bad, _activity("orders")))
        assert r.status_code == 403, r.text
        [detail] = r.json()["details"]
        assert (detail["index"], detail["table"], detail["operation"]) == (len(padding), *problem)
        assert detail["loc"] == f"user_activities.{len(padding)}"
    assert broker.pull(10, 0) == []
    r = _post(client, secrets["orders-backend"], _body(*padding, _activity("orders_eu")))
    assert r.status_code == 200, r.text
    assert {m.attributes["key_id"] for m in broker.pull(10, 0)} == {"orders-backend"}


def test_over_the_rate_answers_429_with_retry_after_then_recovers(app_parts, keys):
    client, broker, clock = app_parts
    _, _, secrets = keys
    batch = _body(*[_activity("t", n=i) for i in range(20)])
    assert _post(client, secrets["limited"], batch).status_code == 200  # the burst
    r = _post(client, secrets["limited"], _body(_activity("t")))
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert _post(client, secrets["orders-backend"], _body(_activity("orders"))).status_code == 200  # other keys unaffected
    clock.now += int(r.headers["retry-after"])  # waiting as told is enough
    assert _post(client, secrets["limited"], _body(_activity("t"))).status_code == 200


def test_rotation_and_revocation_without_a_restart(app_parts, keys):
    client, _, clock = app_parts
    path, (orders, limited, expired), secrets = keys
    rotated, rotated_secret = new_key("orders-backend-2", ["orders*"], ["insert"])
    write_keys_file(path, [orders, limited, expired, rotated])
    clock.now += CHECK_EVERY_SECONDS
    for secret in (secrets["orders-backend"], rotated_secret):  # both valid during the rotation
        assert _post(client, secret, _body(_activity("orders"))).status_code == 200
    write_keys_file(path, [revoked(orders), limited, expired, rotated])
    clock.now += 5  # the bound for a revocation to bite
    assert _post(client, secrets["orders-backend"], _body(_activity("orders"))).status_code == 401
    assert _post(client, rotated_secret, _body(_activity("orders"))).status_code == 200


def test_key_id_in_log_line_and_metrics_and_no_secret_anywhere(app_parts, keys, caplog, tmp_path):
    client, _, _ = app_parts
    path, _, secrets = keys
    caplog.set_level(logging.DEBUG)
    before = scrape(client)
    assert _post(client, secrets["orders-backend"], _body(_activity("orders"), _activity("orders", n=2))).status_code == 200
    assert _post(client, secrets["orders-backend"], _body(_activity("users"))).status_code == 403
    assert _post(client, "not-a-key", _body(_activity("orders"))).status_code == 401
    finished = [r for r in caplog.records if r.getMessage() == "request finished" and r.path == PATH]
    assert [getattr(r, "key", None) for r in finished] == ["orders-backend", "orders-backend", None]
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ingest_key_requests_total", key="orders-backend", status="200") == 1
    assert delta("ingest_key_requests_total", key="orders-backend", status="403") == 1
    assert delta("ingest_key_activities_accepted_total", key="orders-backend") == 2
    changed = {dict(labels)["key"] for (name, labels), v in after.items() if "key" in dict(labels) and v != before.get((name, labels))}
    assert changed == {"orders-backend"}  # the label only ever takes a configured key's id
    client.app.state.keys.close()  # saves last use
    texts = [client.get("/metrics").text, caplog.text, *(p.read_text() for p in tmp_path.rglob("*") if p.is_file()
                                                         and p.suffix in (".toml", ".json"))]
    for secret in secrets.values():
        assert not any(secret in text for text in texts)


def test_a_quarantine_row_names_the_key_that_sent_the_activity(tmp_path, keys):
    from app.messages.codec import decode_message
    from app.schema.identifiers import QUARANTINE_TABLE

    path, _, secrets = keys
    tables_file = tmp_path / "tables.toml"
    tables_file.write_text('[defaults]\ncontract = "discard_row"\nnew_tables = "refuse"\n[tables.orders]\ncolumns = {id = "integer"}\n')
    settings = Settings(data_dir=tmp_path, api_keys_file=path, tables_file=tables_file)
    broker = MemoryBroker(settings)
    with TestClient(create_app(settings, broker=broker)) as client:
        r = _post(client, secrets["orders-backend"], _body(_activity("orders"), _activity("orders_new")))
    assert r.status_code == 200 and r.json()["quarantined"] == 1, r.text
    [row] = [a for m in broker.pull(10, 0) for a in decode_message(m).activities if a.table == QUARANTINE_TABLE]
    assert dict(zip(row.col_names, row.col_values))["key_id"] == "orders-backend"
