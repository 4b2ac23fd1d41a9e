"""What every store shares: states from stored rows, and timed batch ids."""

from __future__ import annotations

import time

from app.messages.codec import new_batch_id
from app.receipts.base import AcceptedRow, OutcomeRow, batch_time, past_retention, receipt_of

BATCH = "0" * 32


def _share(table, messages=1, activities=1, quarantined=0, at=100.0):
    return AcceptedRow(table, "k", at, messages, activities, quarantined)


def _outcome(table, chunk, applied=1, dead=0, reason=None, at=200.0):
    return OutcomeRow(f"{BATCH}:{table}:{chunk}", table, applied, dead, reason, at)


def test_rows_written_twice_count_once():
    receipt = receipt_of(BATCH, [_share("t", messages=2, activities=2), _share("t", messages=2, activities=2)],
                         [_outcome("t", 0), _outcome("t", 0, at=300.0), _outcome("t", 1, at=250.0)])
    [table] = receipt.tables
    assert (table.state, table.activities, table.rows_applied, table.settled_at) == ("applied", 2, 2, 250.0)


def test_states_per_table_and_the_batch_takes_the_least_settled():
    receipt = receipt_of(BATCH, [_share("a", messages=2), _share("b"), _share("c", messages=0, activities=0, quarantined=3)],
                         [_outcome("a", 0), _outcome("b", 0, applied=0, dead=1, reason="type conflict")])
    assert [(t.table, t.state) for t in receipt.tables] == [("a", "accepted"), ("b", "dead_lettered"), ("c", "quarantined")]
    assert receipt.tables[1].reason == "type conflict" and receipt.tables[0].settled_at is None
    assert receipt.state == "accepted"
    assert receipt_of(BATCH, [], [_outcome("a", 0)]) is None  # outcomes alone: never accepted here


def test_plain_batch_ids_carry_their_time_and_idempotent_ones_never_look_timed():
    before = time.time()
    made = batch_time(new_batch_id(None))
    assert made is not None and before - 0.002 <= made <= time.time() + 0.002
    keyed = [new_batch_id(f"key-{i}", "fingerprint") for i in range(400)]
    assert all(batch_time(b) is None for b in keyed)  # 1 in 16 digests would have a '7' there
    assert keyed[0] == new_batch_id("key-0", "fingerprint")  # still derived, for retries
    assert not past_retention(new_batch_id(None), 60) and past_retention(new_batch_id(None), 60, now=time.time() + 61)
    assert not past_retention(BATCH, 0)  # an id without a time is never past retention by its id
