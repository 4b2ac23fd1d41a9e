"""The subscriber loop over a real local broker and DuckDB file (no processes)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from app.broker import OutgoingMessage
from app.broker.local import LocalBroker
from app.pipeline.codec import encode_batch, new_batch_id
from app.pipeline.deadletter import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.duckdb import DuckDBWarehouse


@pytest.fixture
def parts(tmp_path):
    settings = Settings(data_dir=tmp_path, max_delivery_attempts=3, ack_deadline_seconds=30)
    broker = LocalBroker(settings)
    warehouse = DuckDBWarehouse(settings)
    store = DeadLetterStore(settings.dead_letter_file)
    yield settings, broker, warehouse, store, Subscriber(settings, broker, warehouse, store)
    broker.close()
    warehouse.close()
    store.close()


def _publish(broker, messages):
    asyncio.run(broker.publish(messages, batch_id=messages[0].attributes["batch_id"]))


def _insert(table, n, value="x"):
    return Activity("insert", table, ["n", "s"], ["integer", "string"], [n, value])


def _drain(broker, subscriber, rounds=10):
    for _ in range(rounds):
        messages = broker.pull(100, 0.05)
        if messages:
            subscriber.process(messages)


def test_applies_and_acks_in_order(parts):
    settings, broker, warehouse, store, sub = parts
    for i in range(3):
        _publish(broker, encode_batch([_insert("t", i), _insert("u", i)], new_batch_id(None)))
    _publish(broker, encode_batch([Activity("delete", "t", ["n"], ["integer"], [1])], new_batch_id(None)))
    _drain(broker, sub)
    assert warehouse.query("SELECT n FROM t ORDER BY n")[1] == [(0,), (2,)]
    assert warehouse.query("SELECT count(*) FROM u")[1] == [(3,)]
    assert broker.backlog().messages == 0
    assert sub.totals.messages_acked == 7 and store.count() == 0


def test_undecodable_message_is_dead_lettered_at_once_and_the_rest_flows(parts):
    settings, broker, warehouse, store, sub = parts
    _publish(broker, [OutgoingMessage(b"\x00garbage", "t", {"table": "t", "batch_id": "b", "dedup_id": "b:t:0"})])
    _publish(broker, encode_batch([_insert("t", 1)], new_batch_id(None)))
    _drain(broker, sub)
    assert warehouse.query("SELECT n FROM t")[1] == [(1,)]
    [letter] = store.list()
    assert letter.kind == "message" and letter.payload == b"\x00garbage" and "undecodable" in letter.reason


def test_message_the_warehouse_refuses_is_retried_then_dead_lettered_alone(parts):
    settings, broker, warehouse, store, sub = parts
    # Bypasses the API's validation: a datetime DuckDB cannot parse.
    bad = Activity("insert", "t", ["n", "d"], ["integer", "datetime"], [99, "not a datetime"])
    _publish(broker, encode_batch([_insert("t", 1)], new_batch_id(None)))
    _publish(broker, encode_batch([bad], new_batch_id(None)))
    _publish(broker, encode_batch([_insert("t", 2)], new_batch_id(None)))
    for _ in range(settings.max_delivery_attempts + 2):
        messages = broker.pull(100, 3.0)  # waits out the nack delay that holds the key back
        if messages:
            sub.process(messages)
    assert sorted(warehouse.query("SELECT n FROM t")[1]) == [(1,), (2,)]
    [letter] = store.list()
    assert letter.kind == "message" and letter.attempts == settings.max_delivery_attempts
    assert orjson.loads(letter.payload)["activities"][0]["col_values"] == [99, "not a datetime"]
    assert broker.backlog().messages == 0


def test_redelivered_message_is_not_applied_twice(parts):
    settings, broker, warehouse, store, sub = parts
    messages = encode_batch([_insert("t", 1), _insert("t", 2)], "fixed-batch")
    _publish(broker, messages)
    _publish(broker, messages)  # a re-publish of the same chunk (same dedup_id)
    _drain(broker, sub)
    assert warehouse.query("SELECT count(*) FROM t")[1] == [(2,)]
    assert sub.totals.duplicates_skipped == 1
