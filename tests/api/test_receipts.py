"""`GET /api-log/v1/batches/{id}`: the POST's receipt URL answers, with the key rules; 404 and 410."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.keys import new_key, write_keys_file
from app.receipts.base import Outcome
from app.schema.identifiers import QUARANTINE_TABLE
from app.settings import Settings

PATH = "/api-log/v1/"


def _body(table: str) -> dict:
    return {"user_activities": [
        {"operation": "insert", "table": table, "col_names": ["id"], "col_types": ["integer"], "col_values": [1]}
    ]}


@pytest.fixture
def parts(tmp_path):
    orders, orders_secret = new_key("orders-backend", ["orders*"], ["insert"])
    users, users_secret = new_key("users-backend", ["users"], ["insert"])
    write_keys_file(tmp_path / "keys.toml", [orders, users])
    settings = Settings(data_dir=tmp_path, api_keys="admin-secret", api_keys_file=tmp_path / "keys.toml")
    with TestClient(create_app(settings)) as client:
        yield client, {"orders": {"Authorization": f"Bearer {orders_secret}"},
                       "users": {"Authorization": f"Bearer {users_secret}"},
                       "admin": {"X-API-Key": "admin-secret"}}


def test_the_receipt_url_answers_for_the_sending_key_only(parts):
    client, auth = parts
    r = client.post(PATH, json=_body("orders"), headers=auth["orders"])
    assert r.status_code == 200, r.text
    receipt_url = r.json()["receipt"]
    got = client.get(receipt_url, headers=auth["orders"])
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["batch_id"], body["state"], body["key_id"]) == (r.json()["batch_id"], "accepted", "orders-backend")
    assert body["tables"] == [{"table": "orders", "state": "accepted", "activities": 1, "rows_applied": 0,
                               "rows_dead_lettered": 0, "quarantined": 0, "settled_at": None, "reason": None}]
    other = client.get(receipt_url, headers=auth["users"])
    unknown = client.get(PATH + "batches/" + "f" * 32, headers=auth["users"])
    assert other.status_code == unknown.status_code == 404 and other.json() == unknown.json()  # ids do not leak
    assert client.get(receipt_url, headers=auth["admin"]).status_code == 200  # API_KEYS keys see every batch
    assert client.get(receipt_url).status_code == 401
    assert client.get(PATH + "batches/not-a-batch-id", headers=auth["admin"]).status_code == 404


def test_outcomes_show_and_a_purged_batch_answers_410(parts):
    client, auth = parts
    batch_id = client.post(PATH, json=_body("orders"), headers=auth["orders"]).json()["batch_id"]
    writer = client.app.state.receipts
    writer.flush()
    writer.store.add_outcomes([Outcome(f"{batch_id}:orders:0", batch_id, "orders", 1)])
    body = client.get(PATH + "batches/" + batch_id, headers=auth["orders"]).json()
    assert (body["state"], body["tables"][0]["rows_applied"]) == ("applied", 1)
    writer.store.purge(retention_seconds=0)
    assert client.get(PATH + "batches/" + batch_id, headers=auth["orders"]).status_code == 410
    assert client.get(PATH + "batches/" + batch_id, headers=auth["users"]).status_code == 404  # still not theirs


def test_a_table_whose_activities_a_contract_quarantined_shows_quarantined(tmp_path):
    tables_file = tmp_path / "tables.toml"
    tables_file.write_text('[defaults]\ncontract = "discard_row"\nnew_tables = "refuse"\n'
                           '[tables.orders]\ncolumns = {id = "integer"}\n')
    body = {"user_activities": [*_body("orders")["user_activities"], *_body("clicks")["user_activities"],
                                *_body("clicks")["user_activities"]]}
    with TestClient(create_app(Settings(data_dir=tmp_path, tables_file=tables_file))) as client:
        r = client.post(PATH, json=body)
        assert r.status_code == 200 and r.json()["quarantined"] == 2, r.text
        receipt = client.get(r.json()["receipt"]).json()
    by_table = {t["table"]: t for t in receipt["tables"]}
    assert (by_table["orders"]["state"], by_table["orders"]["activities"], by_table["orders"]["quarantined"]) == ("accepted", 1, 0)
    assert (by_table["clicks"]["state"], by_table["clicks"]["activities"], by_table["clicks"]["quarantined"]) == ("quarantined", 0, 2)
    assert by_table[QUARANTINE_TABLE]["state"] == "accepted"  # the quarantine rows themselves, on their way
    assert receipt["state"] == "accepted"


def test_a_timed_batch_id_past_retention_answers_410_to_every_key(parts):
    client, auth = parts
    made = time.time() - 8 * 86400  # RECEIPT_RETENTION_DAYS is 7
    old = f"{int(made * 1000):012x}7" + "0" * 19  # as `new_batch_id` makes them, long ago
    for who in ("orders", "users", "admin"):
        assert client.get(PATH + "batches/" + old, headers=auth[who]).status_code == 410
