"""`_ingest_receipts` on BigQuery: the table's partitioning, clustering and expiration, and
what a lookup reads. (What it answers is the receipts contract suite, tests/receipts.)"""

from __future__ import annotations

import time

import pytest

from app.messages.codec import new_batch_id
from app.receipts.base import Accepted, Outcome
from app.warehouse.bigquery.receipts import RECEIPTS_TABLE, BigQueryReceiptStore

pytestmark = pytest.mark.emulator


@pytest.fixture
def store(settings):
    s = BigQueryReceiptStore(settings.model_copy(update={"receipt_retention_days": 7.0}))
    yield s
    s.close()


def test_the_table_is_day_partitioned_clustered_by_batch_and_kept_a_day_past_retention(store, settings):
    batch = new_batch_id(None)
    store.add_accepted([(batch, "k", time.time(), [Accepted("orders", 1, 1)])])
    table = store.client.get_table(f"{settings.gcp_project}.{settings.bigquery_dataset}.{RECEIPTS_TABLE}")
    assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", "at")
    assert int(table.time_partitioning.expiration_ms) == 8 * 86_400_000  # every row kept >= 7 days
    assert list(table.clustering_fields) == ["batch_id"]


def test_a_longer_retention_lengthens_the_partition_expiration(store, settings):
    store.add_accepted([(new_batch_id(None), None, time.time(), [Accepted("t", 1, 1)])])
    longer = BigQueryReceiptStore(settings.model_copy(update={"receipt_retention_days": 30.0}))
    try:
        assert longer.lookup(new_batch_id(None)) is None
        table = longer.client.get_table(f"{settings.gcp_project}.{settings.bigquery_dataset}.{RECEIPTS_TABLE}")
        assert int(table.time_partitioning.expiration_ms) == 31 * 86_400_000
    finally:
        longer.close()


def test_a_lookup_is_one_query_filtered_on_the_partition_and_the_batch(store, monkeypatch):
    batch = new_batch_id(None)
    store.add_accepted([(batch, "k", time.time(), [Accepted("orders", 1, 1)])])
    store.add_outcomes([Outcome(f"{batch}:orders:0", batch, "orders", 1)])
    sent: list[tuple[str, dict]] = []
    query = store.client.query

    def recording(sql, params, kind, what):
        sent.append((sql, {p.name: p.value for p in params}))
        return query(sql, params, kind, what)

    monkeypatch.setattr(store.client, "query", recording)
    assert store.lookup(batch).state == "applied"
    [(sql, params)] = sent
    assert "at >= @since" in sql and "batch_id = @batch_id" in sql
    assert params["batch_id"] == batch
    assert time.time() - 600 <= params["since"].timestamp() <= time.time()  # from the id's own time: today's partition


def test_a_timed_id_past_retention_costs_no_query(store, monkeypatch):
    old = new_batch_id(None)
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 8 * 86400)
    monkeypatch.setattr(store.client, "query", lambda *a, **k: pytest.fail("queried"))
    assert store.lookup(old) is None and store.gone(old)[0]
