"""The local receipts file: tombstones past retention, writes in chunks. (What every store
answers is in test_contract.py.)"""

from __future__ import annotations

import time

import pytest

from app.messages.codec import new_batch_id
from app.receipts.base import ANY_SENDER, Accepted, Outcome
from app.receipts.sqlite import ROWS_PER_STATEMENT, SqliteReceiptStore

BATCH = "0" * 32


@pytest.fixture
def store(tmp_path):
    s = SqliteReceiptStore(tmp_path / "receipts.sqlite", retention_seconds=3600)
    yield s
    s.close()


def test_unknown_batch_and_purge_past_retention_leave_a_tombstone(store):
    assert store.lookup(BATCH) is None and store.gone(BATCH) == (False, None)
    fresh = "1" * 32
    store.add_accepted([(BATCH, "k", 100.0, [Accepted("t", 1, 1)]), (fresh, "k", 1000.0, [Accepted("t", 1, 1)])])
    store.add_outcomes([Outcome(f"{BATCH}:t:0", BATCH, "t", 1)])
    assert store.purge(retention_seconds=500, now=1100.0) == 1
    assert store.lookup(BATCH) is None and store.gone(BATCH) == (True, "k")
    assert store.lookup(fresh) is not None


def test_a_timed_id_past_retention_is_gone_after_its_tombstone_is(store, monkeypatch):
    old = new_batch_id(None)
    assert store.gone(old) == (False, None)
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 3601)
    gone, sender = store.gone(old)
    assert gone and sender is ANY_SENDER  # no tombstone: the id's own time tells, to any key


def test_a_write_larger_than_one_statement_keeps_every_row(store):
    n = ROWS_PER_STATEMENT * 2 + 5
    store.add_accepted([(BATCH, None, time.time(), [Accepted(f"t{i}", 1, 1) for i in range(n)])])
    store.add_outcomes([Outcome(f"{BATCH}:t{i}:0", BATCH, f"t{i}", 1) for i in range(n)])
    receipt = store.lookup(BATCH)
    assert len(receipt.tables) == n and receipt.state == "applied"
    assert [t.table for t in receipt.tables] == [f"t{i}" for i in range(n)]  # in the order accepted
