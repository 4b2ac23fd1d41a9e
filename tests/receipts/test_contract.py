"""What every receipts store answers (conftest.STORES): states per table, each message
counted once however often it is written, 404 and 410 by the batch id."""

from __future__ import annotations

import time

from app.messages.codec import new_batch_id
from app.receipts.base import ANY_SENDER, Accepted, Outcome
from tests.receipts.conftest import RETENTION_DAYS


def test_accepted_until_every_message_of_a_table_settles_then_applied(store):
    batch = new_batch_id(None)
    store.add_accepted([(batch, "orders-backend", time.time(), [Accepted("orders", 2, 7)])])
    [table] = store.lookup(batch).tables
    assert (table.state, table.activities, table.rows_applied, table.settled_at) == ("accepted", 7, 0, None)
    store.add_outcomes([Outcome(f"{batch}:orders:0", batch, "orders", 4)])
    assert store.lookup(batch).tables[0].state == "accepted"  # one chunk of two
    store.add_outcomes([Outcome(f"{batch}:orders:1", batch, "orders", 3)])
    store.add_outcomes([Outcome(f"{batch}:orders:1", batch, "orders", 3)])  # a redelivery counts once
    receipt = store.lookup(batch)
    [table] = receipt.tables
    assert (receipt.state, receipt.key_id, table.state, table.rows_applied) == ("applied", "orders-backend", "applied", 7)
    assert table.settled_at is not None and abs(table.settled_at - time.time()) < 600


def test_a_mixed_batch_reports_each_table(store):
    batch = new_batch_id(None)
    accepted_at = time.time()
    store.add_accepted([(batch, None, accepted_at, [Accepted("orders", 1, 3), Accepted("users", 1, 1)])])
    store.add_accepted([(batch, None, accepted_at, [Accepted("orders", 1, 3), Accepted("users", 1, 1)])])  # written twice
    store.add_outcomes([
        Outcome(f"{batch}:orders:0", batch, "orders", 2, 1, "type conflict: id is integer"),
        Outcome(f"{batch}:users:0", batch, "users", 1),
    ])
    receipt = store.lookup(batch)
    orders, users = receipt.tables
    assert (orders.table, orders.state, orders.rows_applied, orders.rows_dead_lettered, orders.reason) == (
        "orders", "dead_lettered", 2, 1, "type conflict: id is integer")
    assert (users.table, users.state, users.activities, users.rows_applied) == ("users", "applied", 1, 1)
    assert receipt.state == "dead_lettered" and abs(receipt.accepted_at - accepted_at) < 0.001
    assert receipt.as_json()["accepted_at"].endswith("+00:00")


def test_a_table_a_contract_quarantined_whole_is_quarantined(store):
    batch = new_batch_id(None)
    store.add_accepted([(batch, "k", time.time(), [Accepted("orders", 1, 1), Accepted("clicks", 0, 0, 2)])])
    orders, clicks = store.lookup(batch).tables
    assert (orders.state, clicks.state, clicks.quarantined) == ("accepted", "quarantined", 2)


def test_unknown_batches_are_not_found_and_timed_ids_past_retention_are_gone(store, monkeypatch):
    unknown = new_batch_id(None)
    keyed = new_batch_id("idempotency-key", "fingerprint")  # no time in it
    store.add_accepted([(new_batch_id(None), "k", time.time(), [Accepted("t", 1, 1)])])  # someone else's
    for batch in (unknown, keyed):
        assert store.lookup(batch) is None and store.gone(batch) == (False, None)
    later = time.time() + RETENTION_DAYS * 86400 + 1
    monkeypatch.setattr(time, "time", lambda: later)
    gone, sender = store.gone(unknown)
    assert gone and sender is ANY_SENDER
    assert store.lookup(unknown) is None
    assert store.gone(keyed) == (False, None)  # never seen: still 404
