"""Type widening through the subscriber: the column widens, the metric counts it."""

from __future__ import annotations

import asyncio

from app import metrics
from app.broker.local import LocalBroker
from app.messages.codec import encode_batch, new_batch_id
from app.messages.deadletters import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.duckdb import DuckDBWarehouse
from tests.support.subscribers import running, wait_until


def test_a_wider_value_widens_the_column_and_counts_in_columns_widened_total(tmp_path):
    settings = Settings(data_dir=tmp_path)
    broker, warehouse, dead = LocalBroker(settings), DuckDBWarehouse(settings), DeadLetterStore(settings.dead_letter_file)
    subscriber = Subscriber(settings, broker, warehouse, dead)
    before = metrics.SUBSCRIBER.get_sample_value("columns_widened_total", {"table": "prices"}) or 0
    try:
        with running(subscriber):
            for n, (value_type, value) in enumerate((("integer", 12), ("numeric", "12.5"), ("integer", 13)), 1):
                messages = encode_batch([Activity("insert", "prices", ["amount"], [value_type], [value])], new_batch_id(None))
                asyncio.run(broker.publish(messages, batch_id=messages[0].attributes["batch_id"]))
                wait_until(lambda: subscriber.totals.messages_acked == n, f"message {n} applied")  # noqa: B023
        with subscriber.warehouse_lock:
            assert warehouse.table_schema("prices") == {"amount": "numeric"}
            assert sorted(warehouse.query("SELECT CAST(amount AS VARCHAR) FROM prices")[1]) == [
                ("12.000000000",), ("12.500000000",), ("13.000000000",)
            ]
        assert dead.count() == 0
        assert metrics.SUBSCRIBER.get_sample_value("columns_widened_total", {"table": "prices"}) == before + 1
    finally:
        broker.close()
        warehouse.close()
        dead.close()


def _apply_in_turn(tmp_path, tables_text: str, activities: list[Activity]):
    path = tmp_path / "tables.toml"
    path.write_text(tables_text)
    settings = Settings(data_dir=tmp_path, tables_file=path, max_delivery_attempts=1)
    broker, warehouse, dead = LocalBroker(settings), DuckDBWarehouse(settings), DeadLetterStore(settings.dead_letter_file)
    subscriber = Subscriber(settings, broker, warehouse, dead)
    try:
        with running(subscriber):
            for n, activity in enumerate(activities, 1):
                messages = encode_batch([activity], new_batch_id(None))
                asyncio.run(broker.publish(messages, batch_id=messages[0].attributes["batch_id"]))
                wait_until(lambda: subscriber.totals.messages_acked == n, f"message {n} settled")  # noqa: B023
        with subscriber.warehouse_lock:
            quarantined = warehouse.query("SELECT table_name, rule, column_name, reason FROM _ingest_quarantine")[1] \
                if warehouse.table_schema("_ingest_quarantine") else []
            notes = warehouse.query("SELECT note FROM orders")[1]
        return quarantined, notes, dead.count()
    finally:
        broker.close()
        warehouse.close()
        dead.close()


ORDERS = '[tables.orders]\ncolumns = {{id = "integer"}}\ncontract = {{types = "{mode}"}}\n'
NOTES = [
    Activity("insert", "orders", ["id", "note"], ["integer", "integer"], [1, 7]),
    Activity("insert", "orders", ["id", "note"], ["integer", "boolean"], [2, True]),  # note neither takes nor widens
]


def test_a_type_conflict_on_an_undeclared_column_is_quarantined_under_types_discard_row(tmp_path):
    quarantined, notes, dead_letters = _apply_in_turn(tmp_path, ORDERS.format(mode="discard_row"), NOTES)
    assert notes == [(7,)] and dead_letters == 0
    assert quarantined == [("orders", "types", "note", "column 'note' is integer in table orders, activity sends boolean")]


def test_a_type_conflict_on_an_undeclared_column_is_dead_lettered_under_evolve(tmp_path):
    quarantined, notes, dead_letters = _apply_in_turn(tmp_path, ORDERS.format(mode="evolve"), NOTES)
    assert notes == [(7,)] and dead_letters == 1 and quarantined == []
