"""PII policies: hmac / drop / redact at the edge, and the grep test.

The grep test sends known raw values through the API (small and columnar requests, a
quarantined activity, an activity the warehouse dead-letters), runs the subscriber into
DuckDB, and looks for the raw values in the broker's messages, the warehouse (user
tables and `_ingest_quarantine`), the dead letters, every log line and both metrics pages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging

import orjson
import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.api.app import create_app
from app.broker import make_broker
from app.contracts.file import TablesFileInvalid
from app.contracts.pii import REDACTED, parse_hmac_keys
from app.messages.codec import decode_message
from app.messages.deadletters import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.schema.identifiers import QUARANTINE_TABLE
from app.settings import Settings
from app.warehouse import make_warehouse
from tests.support.subscribers import running, wait_until

PATH = "/api-log/v1/"
EMAIL, SSN, PHONE, TOKEN = "raw-email-7f3a@example.com", "raw-ssn-123-45-6789", "raw-phone-555-0199", b"raw-token-bytes-9c1e"
TOKEN_B64 = base64.b64encode(TOKEN).decode()
RAW = (EMAIL, SSN, PHONE, TOKEN_B64, TOKEN.decode())
TABLES = """
[tables.people]
columns = {email = "string", ssn = "string", phone = "string", token = "bytes"}
pii = {email = "hmac", ssn = "drop", phone = "redact", token = "hmac"}
contract = {columns = "evolve", types = "freeze"}

[tables."audit_*"]
columns = {email = "string"}
pii = {email = "hmac"}
contract = "discard_row"
"""
PEOPLE_NAMES = ["email", "ssn", "phone", "token", "n"]
PEOPLE_TYPES = ["string", "string", "string", "bytes", "integer"]


def _digest(key: bytes, data: bytes) -> str:
    return "v2:" + hmac.new(key, data, hashlib.sha256).hexdigest()


def _person(n, n_type="integer"):
    return {"operation": "insert", "table": "people", "col_names": PEOPLE_NAMES,
            "col_types": [*PEOPLE_TYPES[:-1], n_type], "col_values": [EMAIL, SSN, PHONE, TOKEN_B64, n]}


def _settings(tmp_path, **values):
    path = tmp_path / "tables.toml"
    path.write_text(TABLES)
    return Settings(data_dir=tmp_path, tables_file=path, pii_hmac_keys="v2:new-secret,v1:old-secret",
                    retry_backoff_max_seconds=0.05, **values)


def _leaks(text: str) -> list[str]:
    return [raw for raw in RAW if raw in text]


def test_parse_hmac_keys_uses_the_first_and_refuses_malformed_entries():
    assert [k.version for k in parse_hmac_keys("v2:a, v1:b")] == ["v2", "v1"]
    with pytest.raises(ValueError, match="VERSION:SECRET"):
        parse_hmac_keys("justasecret")


def test_hmac_without_keys_is_refused_at_start(tmp_path):
    settings = _settings(tmp_path).model_copy(update={"pii_hmac_keys": None})
    with pytest.raises(TablesFileInvalid, match=r"tables.toml:4: pii policy hmac needs PII_HMAC_KEYS"):
        create_app(settings)


def test_no_raw_pii_value_reaches_broker_warehouse_quarantine_dead_letters_logs_or_metrics(tmp_path, caplog):
    settings = _settings(tmp_path)
    caplog.set_level(logging.DEBUG)
    quarantined = {"operation": "insert", "table": "audit_login", "col_names": ["email", "extra"],
                   "col_types": ["string", "string"], "col_values": [EMAIL, "x"]}
    with TestClient(create_app(settings)) as client:
        assert client.post(PATH, json={"user_activities": [_person(1)]}).status_code == 200
        assert client.post(PATH, json={"user_activities": [_person(i) for i in range(2, 42)]}).status_code == 200
        answer = client.post(PATH, json={"user_activities": [quarantined]})
        assert answer.json()["quarantined"] == 1
        assert client.post(PATH, json={"user_activities": [_person("text", "string")]}).status_code == 200  # dead-lettered later
        api_metrics = client.get("/metrics").text

    broker = make_broker(settings)
    pulled = broker.pull(100, 0.5)
    published = [a.to_dict() for m in pulled for a in decode_message(m).activities]
    assert len(published) == 43
    assert all(not _leaks(m.data.decode("latin-1")) for m in pulled)
    assert not _leaks(orjson.dumps(published).decode())
    person = dict(zip(published[0]["col_names"], published[0]["col_values"]))
    assert person == {"email": _digest(b"new-secret", EMAIL.encode()), "phone": REDACTED,
                      "token": _digest(b"new-secret", TOKEN), "n": 1}  # ssn dropped; deterministic digests
    broker.nack(pulled)

    warehouse, dead_letters = make_warehouse(settings), DeadLetterStore(settings.dead_letter_file)
    try:
        with running(Subscriber(settings, broker, warehouse, dead_letters)):
            wait_until(lambda: dead_letters.count() == 1, "the string n dead-lettered")
            wait_until(lambda: warehouse.count_rows(["people"]) == {"people": 41}, "people applied")
            wait_until(lambda: len(warehouse.query(f"SELECT * FROM {QUARANTINE_TABLE}")[1]) == 1, "quarantine applied")
        people_columns, people = warehouse.query("SELECT * FROM people")
        _, quarantine = warehouse.query(f"SELECT * FROM {QUARANTINE_TABLE}")
        assert "ssn" not in people_columns
        stored = repr(people) + repr(quarantine)
        assert not _leaks(stored) and _digest(b"new-secret", EMAIL.encode()) in stored
        letters = dead_letters.list(include_replayed=True)
        assert len(letters) == 1 and not _leaks(letters[0].payload.decode("latin-1") + letters[0].reason)
        subscriber_metrics = metrics.render(metrics.SUBSCRIBER, broker)[0].decode()
    finally:
        warehouse.close()
        dead_letters.close()
        broker.close()
    assert not _leaks(api_metrics + subscriber_metrics)
    assert not _leaks("\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records))


@pytest.mark.parametrize(("column", "status"), [("phone", 422), ("ssn", 422), ("email", 200)])
def test_a_delete_may_name_a_hashed_column_but_not_a_dropped_or_redacted_one(tmp_path, column, status):
    settings = _settings(tmp_path)
    delete = {"operation": "delete", "table": "people", "col_names": [column], "col_types": ["string"], "col_values": [EMAIL]}
    with TestClient(create_app(settings)) as client:
        answer = client.post(PATH, json={"user_activities": [delete]})
    assert answer.status_code == status
    broker = make_broker(settings)
    try:
        published = [a for m in broker.pull(10, 0.2) for a in decode_message(m).activities]
    finally:
        broker.close()
    if status == 422:
        assert published == [] and f"cannot name column {column!r}" in answer.json()["details"][0]["message"]
    else:
        assert [a.col_values for a in published] == [[_digest(b"new-secret", EMAIL.encode())]]  # matches the stored hash
