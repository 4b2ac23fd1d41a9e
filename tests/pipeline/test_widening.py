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
