"""The subscriber reads the tables file too: at start, and again when it changes.

It needs the file for the options of the tables it creates; a change applies to the next
table created, a change that breaks the file keeps the last good version (log and
/readyz say so).
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from app.broker.local import LocalBroker
from app.messages.codec import encode_batch, new_batch_id
from app.messages.deadletters import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.duckdb import DuckDBWarehouse
from tests.support.subscribers import admin_url, running, wait_until


def _file(description: str) -> str:
    return f'[tables."t_*"]\ndescription = "{description}"\n'


@pytest.fixture
def started(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text(_file("first"))
    settings = Settings(data_dir=tmp_path, tables_file=path, tables_file_check_seconds=0)
    broker, warehouse, dead = LocalBroker(settings), DuckDBWarehouse(settings), DeadLetterStore(settings.dead_letter_file)
    subscriber = Subscriber(settings, broker, warehouse, dead)
    yield path, broker, warehouse, subscriber
    broker.close()
    warehouse.close()
    dead.close()


def _land(broker: LocalBroker, subscriber: Subscriber, table: str) -> None:
    before = subscriber.totals.messages_acked
    messages = encode_batch([Activity("insert", table, ["n"], ["integer"], [1])], new_batch_id(None))
    asyncio.run(broker.publish(messages, batch_id=messages[0].attributes["batch_id"]))
    wait_until(lambda: subscriber.totals.messages_acked > before, f"{table} applied")


def _description(subscriber: Subscriber, table: str) -> str | None:
    with subscriber.warehouse_lock:
        rows = subscriber.warehouse.query("SELECT comment FROM duckdb_tables() WHERE table_name = ?", [table])[1]
    return rows[0][0]


def test_a_changed_file_gives_the_next_table_created_its_new_options(started):
    path, broker, warehouse, subscriber = started
    with running(subscriber):
        _land(broker, subscriber, "t_a")
        path.write_text(_file("second, reloaded"))
        _land(broker, subscriber, "t_b")
    assert (_description(subscriber, "t_a"), _description(subscriber, "t_b")) == ("first", "second, reloaded")


def test_a_broken_change_keeps_the_last_good_version_and_readyz_and_the_log_say_so(started, caplog):
    path, broker, warehouse, subscriber = started
    with admin_url(subscriber) as url, running(subscriber), caplog.at_level(logging.WARNING, logger="app.contracts"):
        path.write_text('[tables."t_*"]\ndescription = 42\n')
        ready = httpx.get(url + "/readyz", timeout=10)
        _land(broker, subscriber, "t_c")
    assert ready.status_code == 200
    shown = ready.json()["tables_file"]
    assert shown["ok"] is False and "description must be a string" in shown["problem"] and ":2:" in shown["problem"]
    assert any("tables file not reloaded" in r.getMessage() for r in caplog.records)
    assert _description(subscriber, "t_c") == "first"


def test_tables_apply_through_the_admin_port_uses_the_file_in_force(started):
    path, broker, warehouse, subscriber = started
    with admin_url(subscriber) as url, running(subscriber):
        _land(broker, subscriber, "t_a")
        path.write_text(_file("second, applied"))
        first = httpx.post(url + "/table-options", json={}, timeout=10)
        again = httpx.post(url + "/table-options", json={}, timeout=10)
    assert first.json()["lines"] == ["t_a: description: 'first' -> 'second, applied'"]
    assert again.json()["lines"] == ["t_a: unchanged"]
    assert _description(subscriber, "t_a") == "second, applied"
