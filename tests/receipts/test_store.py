"""The receipts file: a batch's state per table from what was accepted and what each message became."""

from __future__ import annotations

import pytest

from app.receipts.store import Accepted, Outcome, ReceiptStore

BATCH = "0" * 32


@pytest.fixture
def store(tmp_path):
    s = ReceiptStore(tmp_path / "receipts.sqlite")
    yield s
    s.close()


def test_accepted_until_every_message_of_a_table_settles_then_applied(store):
    store.add_accepted([(BATCH, "orders-backend", 100.0, [Accepted("orders", 2, 7)])])
    [table] = store.lookup(BATCH).tables
    assert (table.state, table.activities, table.rows_applied, table.settled_at) == ("accepted", 7, 0, None)
    store.add_outcomes([Outcome(f"{BATCH}:orders:0", BATCH, "orders", 4)])
    assert store.lookup(BATCH).tables[0].state == "accepted"  # one chunk of two
    store.add_outcomes([Outcome(f"{BATCH}:orders:1", BATCH, "orders", 3)])
    store.add_outcomes([Outcome(f"{BATCH}:orders:1", BATCH, "orders", 3)])  # a redelivery counts once
    receipt = store.lookup(BATCH)
    [table] = receipt.tables
    assert (receipt.state, receipt.key_id, table.state, table.rows_applied) == ("applied", "orders-backend", "applied", 7)
    assert table.settled_at is not None


def test_a_mixed_batch_reports_each_table(store):
    store.add_accepted([(BATCH, None, 100.0, [Accepted("orders", 1, 3), Accepted("users", 1, 1)])])
    store.add_outcomes([
        Outcome(f"{BATCH}:orders:0", BATCH, "orders", 2, 1, "type conflict: id is integer"),
        Outcome(f"{BATCH}:users:0", BATCH, "users", 1),
    ])
    receipt = store.lookup(BATCH)
    orders, users = receipt.tables
    assert (orders.table, orders.state, orders.rows_applied, orders.rows_dead_lettered, orders.reason) == (
        "orders", "dead_lettered", 2, 1, "type conflict: id is integer")
    assert (users.table, users.state, users.rows_applied) == ("users", "applied", 1)
    assert receipt.state == "dead_lettered"
    body = receipt.as_json()
    assert [t["state"] for t in body["tables"]] == ["dead_lettered", "applied"] and body["accepted_at"].endswith("+00:00")


def test_unknown_batch_and_purge_past_retention_leave_a_tombstone(store):
    assert store.lookup(BATCH) is None and store.purged_key(BATCH) == (False, None)
    fresh = "1" * 32
    store.add_accepted([(BATCH, "k", 100.0, [Accepted("t", 1, 1)]), (fresh, "k", 1000.0, [Accepted("t", 1, 1)])])
    store.add_outcomes([Outcome(f"{BATCH}:t:0", BATCH, "t", 1)])
    assert store.purge(retention_seconds=500, now=1100.0) == 1
    assert store.lookup(BATCH) is None and store.purged_key(BATCH) == (True, "k")
    assert store.lookup(fresh) is not None
