"""Quarantine list and replay: rows land in `_ingest_quarantine`; a replay publishes what the
current file allows, with a delete of its quarantine row, and keeps and reports the rest."""

from __future__ import annotations

import socket

from fastapi.testclient import TestClient

from app.api.app import create_app
from app.broker import make_broker
from app.messages.deadletters import DeadLetterStore
from app.pipeline.quarantine import list_entries, replay
from app.pipeline.subscriber import Subscriber
from app.schema.identifiers import QUARANTINE_TABLE
from app.settings import Settings
from app.warehouse import make_warehouse
from tests.support.subscribers import running, wait_until

PATH = "/api-log/v1/"
FROZEN = '[tables.orders]\ncolumns = {id = "integer"}\ncontract = "discard_row"\n'
ALLOWED = '[tables.orders]\ncolumns = {id = "integer", coupon = "string"}\ncontract = "discard_row"\n'


def _free_port() -> int:
    with socket.socket() as s:  # no subscriber admin port answers: the tools read the warehouse directly
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _order(i, extra=None):
    names, types, values = ["id"], ["integer"], [i]
    if extra:
        names, types, values = [*names, extra], [*types, "string"], [*values, "x"]
    return {"operation": "insert", "table": "orders", "col_names": names, "col_types": types, "col_values": values}


def _drain(settings, until):
    broker, warehouse, store = make_broker(settings), make_warehouse(settings), DeadLetterStore(settings.dead_letter_file)
    try:
        with running(Subscriber(settings, broker, warehouse, store)):
            wait_until(lambda: until(warehouse), "the subscriber applied")
        return warehouse.query("SELECT id FROM orders ORDER BY id")[1], store.count()
    finally:
        warehouse.close()
        store.close()
        broker.close()


def _quarantined(warehouse) -> int:
    return warehouse.query(f"SELECT count(*) FROM {QUARANTINE_TABLE}")[1][0][0]


def test_list_and_replay_once_the_contract_allows(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text(FROZEN)
    settings = Settings(data_dir=tmp_path, tables_file=path, subscriber_port=_free_port(), retry_backoff_max_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        answer = client.post(PATH, json={"user_activities": [_order(1), _order(2, "coupon"), _order(3, "other")]})
    assert answer.json()["quarantined"] == 2
    rows, dead = _drain(settings, lambda w: w.count_rows(["orders"]) == {"orders": 1} and _quarantined(w) == 2)
    assert rows == [(1,)] and dead == 0

    entries = list_entries(settings)
    assert [(e.activity_index, e.rule, e.column_name) for e in entries] == [(1, "columns", "coupon"), (2, "columns", "other")]
    assert list_entries(settings, table="elsewhere") == []
    assert list_entries(settings, since="2999-01-01T00:00:00Z") == []

    path.write_text(ALLOWED)  # coupon is declared now; `other` still is not
    outcomes = replay(settings)
    assert [(o.entry.activity_index, o.batch_id is not None) for o in outcomes] == [(1, True), (2, False)]
    assert "column 'other' is not declared" in outcomes[1].problem
    rows, dead = _drain(settings, lambda w: w.count_rows(["orders"]) == {"orders": 2} and _quarantined(w) == 1)
    assert rows == [(1,), (2,)] and dead == 0
    assert [e.activity_index for e in list_entries(settings)] == [2]  # the one that would fail again stays
