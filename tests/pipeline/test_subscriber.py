"""The subscriber loop: per-table workers, order, flow control, retries and dead letters.

Most tests run the real loop (`Subscriber.run` on a thread) against the in-memory broker
(tests/support/memory_broker.py) and the in-memory warehouse, whose `before_apply` hook
each test scripts (block, raise). The broker hands nacked messages back at once and
records the delay asked for, so retry paths run without waiting. The last tests run
the loop over the real local broker and DuckDB.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import threading
import time
from typing import Sequence

import orjson
import pytest

from app.broker import BrokerUnavailable, OutgoingMessage, ReceivedMessage
from app.broker.local import LocalBroker
from app.messages.codec import decode_message, encode_batch, json_body, new_batch_id
from app.messages.deadletters import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.receipts.sqlite import SqliteReceiptStore
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.base import Envelope, TransientWarehouseError, WarehouseUnavailable
from app.warehouse.duckdb import DuckDBWarehouse
from tests.support.memory_warehouse import MemoryWarehouse
from tests.support.memory_broker import MemoryBroker
from tests.support.subscribers import WAIT_SECONDS, running, wait_until

def _insert(table: str, n: int, value: str = "x") -> Activity:
    return Activity("insert", table, ["n", "s"], ["integer", "string"], [n, value])


def _numbers(envelopes: Sequence[Envelope]) -> list[int]:
    return [a.col_values[0] for e in envelopes for a in e.activities]


# --------------------------------------------------------------------------- fakes


def _broker(**capabilities) -> MemoryBroker:
    """The in-memory broker, handing nacked messages back at once (the delay is recorded)."""
    capabilities.setdefault("max_lease_seconds", 600.0)
    return MemoryBroker(redeliver_nacked_at_once=True, **capabilities)


def _applied(warehouse: MemoryWarehouse, table: str) -> list[list[int]]:
    """The numbers each committed apply of `table` carried, in commit order."""
    return [_numbers(envelopes) for envelopes in warehouse.observer.applied[table]]


def _applied_numbers(warehouse: MemoryWarehouse, table: str) -> list[int]:
    return [n for numbers in _applied(warehouse, table) for n in numbers]


@pytest.fixture
def store(tmp_path):
    s = DeadLetterStore(tmp_path / "dead.sqlite")
    yield s
    s.close()


def _settings(tmp_path, **values) -> Settings:
    base = dict(data_dir=tmp_path, max_delivery_attempts=3, subscriber_workers=4, retry_backoff_max_seconds=0.05)
    base.update(values)
    return Settings(**base)


# --------------------------------------------------------------------------- concurrency and order


def test_a_blocked_table_does_not_stop_another_from_applying_and_acking(tmp_path, store):
    gate, entered = threading.Event(), threading.Event()

    def plan(table, envelopes):
        if table == "slow":
            entered.set()
            assert gate.wait(WAIT_SECONDS)

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    [slow_id] = broker.put_activities(_insert("slow", 1))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        assert entered.wait(WAIT_SECONDS)
        fast_ids = broker.put_activities(_insert("fast", 1)) + broker.put_activities(_insert("fast", 2))
        wait_until(lambda: set(fast_ids) <= set(broker.acked), "the fast table acked")
        assert _applied_numbers(warehouse, "fast") == [1, 2]
        assert slow_id not in broker.acked and _applied_numbers(warehouse, "slow") == []  # still in its apply
        gate.set()
        wait_until(lambda: slow_id in broker.acked, "the slow table acked")
    assert _applied_numbers(warehouse, "slow") == [1] and store.count() == 0


def test_without_concurrent_tables_applies_never_overlap(tmp_path, store):
    broker, warehouse = _broker(), MemoryWarehouse(concurrent_tables=False, before_apply=lambda t, e: time.sleep(0.002))
    for i in range(20):
        broker.put_activities(*(_insert(t, i) for t in "abcdef"))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: broker.unacked == 0, "everything acked")
    assert warehouse.observer.max_running == 1
    assert all(_applied_numbers(warehouse, t) == list(range(20)) for t in "abcdef")


def test_each_table_applies_in_pull_order_one_batch_at_a_time(tmp_path, store):
    # Later messages of a key are handed out while earlier ones are still held, so the
    # subscriber's own per-table queue must keep the order.
    broker = _broker(one_run_per_key=False)
    warehouse = MemoryWarehouse(before_apply=lambda t, e: time.sleep(0.001))
    settings = _settings(tmp_path, pull_max_messages=7)
    with running(Subscriber(settings, broker, warehouse, store)):
        for i in range(60):
            broker.put_activities(*(_insert(t, i) for t in ("a", "b", "c")))
        wait_until(lambda: broker.unacked == 0, "everything acked")
    for table in ("a", "b", "c"):
        assert _applied_numbers(warehouse, table) == list(range(60))
    assert warehouse.observer.overlaps == []


def test_a_backlog_of_one_table_applies_many_messages_per_apply(tmp_path, store):
    gate, entered = threading.Event(), threading.Event()

    def plan(table, envelopes):
        entered.set()
        assert gate.wait(WAIT_SECONDS)

    broker = _broker(one_run_per_key=False)
    warehouse = MemoryWarehouse(before_apply=plan)
    broker.put_activities(_insert("t", 0))
    with running(Subscriber(_settings(tmp_path, pull_max_messages=10), broker, warehouse, store)):
        assert entered.wait(WAIT_SECONDS)
        for i in range(1, 31):
            broker.put_activities(_insert("t", i))
        wait_until(lambda: broker.leased == 31, "the backlog pulled while the first apply runs")
        gate.set()
        wait_until(lambda: broker.unacked == 0, "everything acked")
    # Pulled 10 at a time, applied as the size bound allows: 1, then 10 + 10 + 10.
    assert _applied(warehouse, "t") == [[0], list(range(1, 11)), list(range(11, 21)), list(range(21, 31))]


def test_flow_control_bounds_the_messages_held(tmp_path, store):
    gate = threading.Event()
    broker = _broker(one_run_per_key=False)
    warehouse = MemoryWarehouse(before_apply=lambda t, e: gate.wait(WAIT_SECONDS) if t == "a" else None)
    for i in range(10):
        broker.put_activities(_insert("a", i))
    settings = _settings(tmp_path, subscriber_max_outstanding_messages=4)
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: broker.leased == 4, "the limit reached")
        broker.put_activities(_insert("b", 0))
        gate.set()
        wait_until(lambda: broker.unacked == 0, "everything acked")
    assert broker.max_leased <= 4
    assert _applied_numbers(warehouse, "a") == list(range(10)) and _applied_numbers(warehouse, "b") == [0]


def test_when_flow_control_is_full_a_table_waiting_for_a_retry_makes_room(tmp_path, store):
    refused = [True]

    def plan(table, envelopes):
        if table == "waiting" and refused[0]:
            refused[0] = False
            raise TransientWarehouseError("rateLimitExceeded", retry_after=60.0)

    broker = _broker(one_run_per_key=False)
    warehouse = MemoryWarehouse(before_apply=plan)
    held = [m for i in range(4) for m in broker.put_activities(_insert("waiting", i))]
    settings = _settings(tmp_path, subscriber_max_outstanding_messages=4)
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: warehouse.observer.attempts["waiting"] == 1, "the first, refused apply")
        other = broker.put_activities(_insert("other", 1))
        wait_until(lambda: set(other) <= set(broker.acked), "the other table, although the waiting one filled the window")
        wait_until(lambda: set(held) <= set(broker.acked), "the waiting table applied after its redelivery")
    assert {m for m, _ in broker.nacks} == set(held) and all(30 < delay <= 60 for _, delay in broker.nacks)
    assert _applied_numbers(warehouse, "waiting") == [0, 1, 2, 3] and store.count() == 0



def test_when_the_broker_s_intake_is_full_of_a_waiting_table_it_makes_room(tmp_path, store):
    # Pub/Sub's stream window (max_outstanding_messages) counts what the subscriber holds:
    # a table waiting for a retry can fill it while our own flow control has room.
    refused = [True]

    def plan(table, envelopes):
        if table == "waiting" and refused[0]:
            refused[0] = False
            raise TransientWarehouseError("rateLimitExceeded", retry_after=40.0)

    broker = MemoryBroker(redeliver_nacked_at_once=True, one_run_per_key=False, intake_limit=4, max_lease_seconds=600.0)
    warehouse = MemoryWarehouse(before_apply=plan)
    held = [m for i in range(4) for m in broker.put_activities(_insert("waiting", i))]
    settings = _settings(tmp_path, subscriber_max_outstanding_messages=100)
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: warehouse.observer.attempts["waiting"] >= 1, "the first, refused apply")
        other = broker.put_activities(_insert("other", 1))
        wait_until(lambda: set(other) <= set(broker.acked), "the other table, although the waiting one filled the intake")
        wait_until(lambda: set(held) <= set(broker.acked), "the waiting table applied after its redelivery")
    # handed back for the rest of the wait (held in place until then: within the budget)
    assert {m for m, _ in broker.nacks} == set(held) and all(0 < delay <= 40 for _, delay in broker.nacks)
    assert _applied_numbers(warehouse, "waiting") == [0, 1, 2, 3] and store.count() == 0


def test_a_table_stuck_in_a_schema_change_holds_only_its_share_while_another_table_lands(tmp_path, store):
    # The gate stands for a schema change pending for minutes (the new column not yet
    # writable): the apply of "pending" does not return until the test opens it.
    gate, entered = threading.Event(), threading.Event()

    def plan(table, envelopes):
        if table == "pending":
            entered.set()
            assert gate.wait(WAIT_SECONDS)

    broker = MemoryBroker(max_lease_seconds=600.0)  # ordered keys, nack delays honoured
    warehouse = MemoryWarehouse(before_apply=plan)
    pending = [m for i in range(10) for m in broker.put_activities(_insert("pending", i))]
    settings = _settings(
        tmp_path, pull_max_messages=10, subscriber_max_outstanding_messages=6,
        subscriber_max_outstanding_messages_per_table=3,
    )
    with running(Subscriber(settings, broker, warehouse, store)) as subscriber:
        assert entered.wait(WAIT_SECONDS)
        other = [m for i in range(5) for m in broker.put_activities(_insert("other", i))]
        wait_until(lambda: set(other) <= set(broker.acked), "the other table, while the pending one is stuck")
        assert _applied_numbers(warehouse, "other") == [0, 1, 2, 3, 4]
        assert _applied_numbers(warehouse, "pending") == []
        assert subscriber.scheduler.held_by_table() == {"pending": 3}
        # What it could not hold went back to the broker, the newest, for a later delivery.
        assert [m for m, _ in broker.nacks] == pending[3:6] and all(delay >= 30 for _, delay in broker.nacks)
        gate.set()
        wait_until(lambda: set(pending[:3]) <= set(broker.acked), "the pending table, once its change is done")
    assert _applied_numbers(warehouse, "pending") == [0, 1, 2] and store.count() == 0
    assert broker.unacked == 7  # the rest is still in the broker, in order, for the next delivery


def test_a_table_s_next_messages_pulled_the_moment_its_ack_frees_the_key_are_not_handed_back(tmp_path, store):
    broker, warehouse = MemoryBroker(max_lease_seconds=600.0), MemoryWarehouse()  # ordered keys, delays honoured
    sent = [m for i in range(6) for m in broker.put_activities(_insert("t", i))]
    ack = broker.ack

    def ack_then_let_the_puller_take_the_next_run(messages):
        ack(messages)  # the key is free: the puller takes the table's next messages at once
        if messages[-1].message_id == sent[2]:
            wait_until(lambda: broker.leased > 0, "the next run pulled")

    broker.ack = ack_then_let_the_puller_take_the_next_run
    settings = _settings(
        tmp_path, pull_max_messages=3, subscriber_max_outstanding_messages=6,
        subscriber_max_outstanding_messages_per_table=3,
    )
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: set(sent) <= set(broker.acked), "every message, none handed back for a minute")
    assert broker.nacks == [] and broker.acked == sent
    assert _applied_numbers(warehouse, "t") == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- refused activities


def _refused() -> Activity:
    return Activity("insert", "t", ["n"], ["string"], ["not a number"])  # "n" is an integer column


def test_a_refused_activity_reaches_the_broker_s_dead_letters_with_its_reason_before_its_message_is_acked(
    tmp_path, store
):
    broker, warehouse = _broker(), MemoryWarehouse()
    acked_when_forwarded: list[bool] = []
    forward = broker.forward_dead_letters

    def forward_and_look(entries):
        acked_when_forwarded.extend(m.message_id in broker.acked for m, _ in entries)
        forward(entries)

    broker.forward_dead_letters = forward_and_look
    [message_id] = broker.put_activities(_insert("t", 1), _refused(), _insert("t", 2))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: message_id in broker.acked, "the message acked")
    assert acked_when_forwarded == [False]
    [letter] = broker.dead_letter_source().list()
    assert letter.attributes["dead_letter_kind"] == "activity" and "n" in letter.reason
    # The dead letter is a message of that one activity, to be replayed as it is.
    replayed = decode_message(ReceivedMessage("r", letter.data, letter.attributes, "t", 1))
    assert replayed.activities == [_refused()]
    assert _applied(warehouse, "t") == [[1, "not a number", 2]] and store.count() == 1  # committed once


def test_when_the_refusal_cannot_be_forwarded_the_message_comes_back_and_is_forwarded_then(tmp_path, store):
    broker, warehouse = _broker(), MemoryWarehouse()
    forward, failures = broker.forward_dead_letters, [1]

    def flaky_forward(entries):
        if failures.pop() if failures else False:
            raise BrokerUnavailable("dead-letter topic unreachable")
        forward(entries)

    broker.forward_dead_letters = flaky_forward
    [message_id] = broker.put_activities(_insert("t", 1), _refused())
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)) as subscriber:
        wait_until(lambda: message_id in broker.acked, "the message acked after its redelivery")
    assert [m for m, _ in broker.nacks] == [message_id]  # not acked while its refusal was only on disk
    assert len(broker.dead_letter_source().list()) == 1
    assert _applied_numbers(warehouse, "t") == [1, "not a number"] and subscriber.totals.duplicates_skipped == 1

# --------------------------------------------------------------------------- transient errors


def test_transient_errors_never_dead_letter_even_after_many_nacks(tmp_path, store):
    failures_left = collections.Counter({"t": 25})

    def plan(table, envelopes):
        if failures_left[table] > 0:
            failures_left[table] -= 1
            raise TransientWarehouseError("quotaExceeded")

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    ids = broker.put_activities(_insert("t", 1)) + broker.put_activities(_insert("t", 2))
    # No in-place budget: every transient error nacks, so delivery_attempt climbs far
    # beyond MAX_DELIVERY_ATTEMPTS=3.
    settings = _settings(tmp_path, max_in_place_retry_seconds=0)
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: set(ids) <= set(broker.acked), "both acked")
    assert store.count() == 0
    assert _applied_numbers(warehouse, "t") == [1, 2]
    assert len(broker.nacks) >= 25 and all(delay > 0 for _, delay in broker.nacks)


def test_a_warehouse_refusing_everything_blocks_the_subscriber_and_dead_letters_nothing(tmp_path, store):
    from app import metrics

    sub_box: list[Subscriber] = []
    refusals_left = [8]  # far beyond MAX_DELIVERY_ATTEMPTS=3
    seen_while_refused: list[str | None] = []

    def plan(table, envelopes):
        if refusals_left[0] > 0:
            refusals_left[0] -= 1
            seen_while_refused.append(sub_box[0].blocked)
            raise WarehouseUnavailable("403 accessDenied: role revoked", reason="permission_denied")

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    ids = [i for n in range(3) for t in ("a", "b") for i in broker.put_activities(_insert(t, n))]
    # No in-place budget: every refusal hands the messages back, with the slow delay.
    settings = _settings(tmp_path, max_in_place_retry_seconds=0, retry_backoff_max_seconds=0.2)
    sub = Subscriber(settings, broker, warehouse, store)
    sub_box.append(sub)
    gauge = metrics.SUBSCRIBER_BLOCKED.labels("permission_denied")
    with running(sub):
        wait_until(lambda: set(ids) <= set(broker.acked), "everything acked after the refusals")
    assert store.count() == 0 and sub.totals.dead_lettered == 0
    assert seen_while_refused[0] is None and all(b and b.startswith("permission_denied") for b in seen_while_refused[1:])
    assert sub.blocked is None and gauge._value.get() == 0
    assert _applied_numbers(warehouse, "a") == [0, 1, 2] and _applied_numbers(warehouse, "b") == [0, 1, 2]
    assert broker.nacks and all(delay >= 0.2 for _, delay in broker.nacks)  # retried slowly, not at once


class _CountingEvent(threading.Event):
    """A stop event that counts the loop's waits on it (a blocked loop waits on it instead of pulling)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


class _CountingBroker(MemoryBroker):
    pulls = 0

    def __init__(self) -> None:
        super().__init__(redeliver_nacked_at_once=True, max_lease_seconds=600.0)

    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        self.pulls += 1
        return super().pull(max_messages, timeout)


def test_a_blocked_subscriber_does_not_pull_until_its_probe_is_due(tmp_path, store):
    def plan(table, envelopes):
        raise WarehouseUnavailable("UNAUTHENTICATED", reason="unauthenticated")

    broker, warehouse = _CountingBroker(), MemoryWarehouse(before_apply=plan)
    [first] = broker.put_activities(_insert("t", 1))
    # the probe is an hour away and nothing may wait in place: the refused message goes back
    settings = _settings(tmp_path, max_in_place_retry_seconds=0, retry_backoff_max_seconds=3600)
    sub = Subscriber(settings, broker, warehouse, store)
    sub.stop_event = stop = _CountingEvent()
    with running(sub):
        wait_until(lambda: sub.blocked is not None and broker.nacks, "blocked, the message handed back")
        wait_until(lambda: stop.waits >= 1, "the loop waiting instead of pulling")
        pulls = broker.pulls
        later = broker.put_activities(_insert("u", 1))
        wait_until(lambda: stop.waits >= 3, "the loop went round twice more")
        assert broker.pulls == pulls and broker.leased == 0
    assert "u" not in warehouse.observer.attempts  # (a pull already waiting when it blocked may get "t" back)
    assert first not in broker.acked and later[0] not in broker.acked and store.count() == 0


def test_transient_errors_are_retried_in_place_while_the_budget_allows(tmp_path, store):
    failures_left = [3]

    def plan(table, envelopes):
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise TransientWarehouseError("backendError")

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    [message_id] = broker.put_activities(_insert("t", 1))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: message_id in broker.acked, "acked")
    assert broker.nacks == [] and warehouse.observer.attempts["t"] == 4


@pytest.mark.parametrize(
    "retry_after, max_ack_deadline, delay", [(300.0, None, 300.0), (900.0, None, 900.0), (900.0, 600.0, 600.0)]
)
def test_retry_after_beyond_the_budget_nacks_that_table_only_with_that_delay(
    tmp_path, store, retry_after, max_ack_deadline, delay
):
    """...as long a delay as the broker can express (its longest ack deadline)."""
    refused = [True]

    def plan(table, envelopes):
        if table == "new_column" and refused[0]:
            refused[0] = False
            raise TransientWarehouseError("new field not yet visible to the write stream", retry_after=retry_after)

    broker = _broker(max_ack_deadline_seconds=max_ack_deadline)
    warehouse = MemoryWarehouse(before_apply=plan)
    [waiting] = broker.put_activities(_insert("new_column", 1))
    other = broker.put_activities(_insert("other", 1))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: {waiting, *other} <= set(broker.acked), "both tables acked")
    assert broker.nacks == [(waiting, delay)]
    assert store.count() == 0


def test_retry_after_within_the_budget_waits_in_place_and_stop_releases_the_held_messages(tmp_path, store, caplog):
    def plan(table, envelopes):
        if table == "waiting":
            raise TransientWarehouseError("schema not yet visible", retry_after=5.0)

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    held = broker.put_activities(_insert("waiting", 1), _insert("waiting", 2))
    other = broker.put_activities(_insert("other", 1))
    caplog.set_level(logging.WARNING, logger="app.subscriber")
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: warehouse.observer.attempts["waiting"] == 1 and set(other) <= set(broker.acked), "the other table")
        wait_until(lambda: any("retrying waiting in 5.0s" in r.getMessage() for r in caplog.records), "the retry")
        assert broker.nacks == [] and broker.leased == len(held)  # held, in place
    # Stopping hands the held messages back at once, unacked.
    assert sorted(broker.nacks) == sorted((m, 0.0) for m in held)
    assert broker.leased == 0 and not set(held) & set(broker.acked)
    assert warehouse.observer.attempts["waiting"] == 1


def test_in_place_retries_stay_within_half_a_lease_that_is_not_extended(tmp_path, store):
    broker = _broker(max_lease_seconds=None)
    sub = Subscriber(_settings(tmp_path, ack_deadline_seconds=10, max_in_place_retry_seconds=120), broker,
                     MemoryWarehouse(), store)
    assert sub.in_place_budget == 5.0
    extended = Subscriber(_settings(tmp_path), _broker(max_lease_seconds=600), MemoryWarehouse(), store)
    assert extended.in_place_budget == 120.0


def test_messages_held_past_an_unextended_lease_are_handed_back_not_applied(tmp_path, store):
    gate, entered = threading.Event(), threading.Event()

    def plan(table, envelopes):
        if _numbers(envelopes) == [0]:
            entered.set()
            assert gate.wait(WAIT_SECONDS)

    broker = _broker(one_run_per_key=False, max_lease_seconds=None)
    warehouse = MemoryWarehouse(before_apply=plan)
    [first] = broker.put_activities(_insert("t", 0))
    with running(Subscriber(_settings(tmp_path, ack_deadline_seconds=0.2), broker, warehouse, store)):
        assert entered.wait(WAIT_SECONDS)
        [second] = broker.put_activities(_insert("t", 1))
        wait_until(lambda: broker.leased == 2, "the second message held behind the first")
        time.sleep(0.3)  # the second one's lease (the ack deadline) runs out while it waits
        gate.set()
        wait_until(lambda: second in broker.acked, "the second message applied after its redelivery")
    assert (second, 0.0) in broker.nacks and first not in dict(broker.nacks)
    assert _applied(warehouse, "t") == [[0], [1]]


def _capturing_pulls(broker: MemoryBroker, on_message) -> None:
    """Let the test touch each delivered message (as the broker's own threads would)."""
    pull = broker.pull

    def pull_and_touch(max_messages, timeout):
        messages = pull(max_messages, timeout)
        for m in messages:
            on_message(m)
        return messages

    broker.pull = pull_and_touch


def test_a_held_message_whose_lease_the_broker_lost_is_handed_back_not_applied(tmp_path, store):
    gate, entered = threading.Event(), threading.Event()
    delivered: dict[str, list] = collections.defaultdict(list)

    def plan(table, envelopes):
        if _numbers(envelopes) == [0]:
            entered.set()
            assert gate.wait(WAIT_SECONDS)

    broker = _broker(one_run_per_key=False)
    _capturing_pulls(broker, lambda m: delivered[m.message_id].append(m))
    warehouse = MemoryWarehouse(before_apply=plan)
    [first] = broker.put_activities(_insert("t", 0))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        assert entered.wait(WAIT_SECONDS)
        [second] = broker.put_activities(_insert("t", 1))
        wait_until(lambda: delivered[second], "the second message held behind the first")
        delivered[second][0].lease_lost = True  # e.g. Pub/Sub refused its lease extension
        gate.set()
        wait_until(lambda: second in broker.acked, "the second message applied after its redelivery")
    assert (second, 0.0) in broker.nacks and first not in dict(broker.nacks)
    assert len(delivered[second]) == 2  # applied from the redelivery only
    assert _applied(warehouse, "t") == [[0], [1]]


def test_the_lease_guard_counts_from_the_broker_s_delivery_time(tmp_path, store):
    broker = _broker(max_lease_seconds=None)
    delivered_long_ago = time.monotonic() - 60  # longer ago than the 10 s ack deadline
    seen: list = []

    def stamp(m):
        if not seen:  # only the first delivery is old
            m.received_at = delivered_long_ago
        seen.append(m.message_id)

    _capturing_pulls(broker, stamp)
    warehouse = MemoryWarehouse()
    [only] = broker.put_activities(_insert("t", 0))
    with running(Subscriber(_settings(tmp_path, ack_deadline_seconds=10), broker, warehouse, store)):
        wait_until(lambda: only in broker.acked, "the message applied from its redelivery")
    assert (only, 0.0) in broker.nacks  # the old delivery was handed back unapplied
    assert seen == [only, only] and _applied(warehouse, "t") == [[0]]


# --------------------------------------------------------------------------- terminal failures


def test_terminal_culprit_is_dead_lettered_after_n_terminal_failures_and_order_holds(tmp_path, store):
    calls = collections.Counter()

    def plan(table, envelopes):
        numbers = _numbers(envelopes)
        if 2 in numbers:
            calls["bad"] += 1
            # Transient errors in between do not count towards dead-lettering.
            if calls["bad"] % 2:
                raise TransientWarehouseError("rateLimitExceeded")
            raise ValueError("value the warehouse refuses")

    broker, warehouse = _broker(), MemoryWarehouse(before_apply=plan)
    ids = broker.put(
        encode_batch([_insert("t", 1)], "b1") + encode_batch([_insert("t", 2)], "b2")
        + encode_batch([_insert("t", 3)], "b3")
    )
    settings = _settings(tmp_path, max_in_place_retry_seconds=0)  # every transient error nacks too
    with running(Subscriber(settings, broker, warehouse, store)):
        wait_until(lambda: broker.unacked == 0, "everything settled")
    assert _applied_numbers(warehouse, "t") == [1, 3]
    [letter] = store.list()
    assert letter.kind == "message" and letter.dedup_id == "b2:t:0" and letter.message_id == ids[1]
    assert letter.attempts == 3 and "failed 3 times" in letter.reason
    assert orjson.loads(letter.payload)["activities"][0]["col_values"] == [2, "x"]
    # Pub/Sub counted every nack, transient ones included: far more than 3 deliveries.
    assert sum(1 for m, _ in broker.nacks if m == ids[1]) >= 4


def test_undecodable_message_is_dead_lettered_at_once(tmp_path, store):
    broker, warehouse = _broker(), MemoryWarehouse()
    [garbage] = broker.put([OutgoingMessage(b"\x00garbage", "t", {"table": "t", "batch_id": "b", "dedup_id": "b:t:0"})])
    good = broker.put_activities(_insert("t", 1))
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: {garbage, *good} <= set(broker.acked), "both acked")
    [letter] = store.list()
    assert letter.payload == b"\x00garbage" and "undecodable" in letter.reason
    assert _applied_numbers(warehouse, "t") == [1]


def test_dead_letters_keep_the_key_id_the_batch_was_sent_with(tmp_path, store):
    broker, warehouse = _broker(), MemoryWarehouse()
    [garbage] = broker.put([OutgoingMessage(
        b"\x00garbage", "t", {"table": "t", "batch_id": "b", "dedup_id": "b:t:0", "key_id": "orders-backend"}
    )])
    with running(Subscriber(_settings(tmp_path), broker, warehouse, store)):
        wait_until(lambda: garbage in broker.acked, "acked")
    [letter] = store.list()
    assert letter.key_id == "orders-backend"


# --------------------------------------------------------------------------- the local broker and DuckDB


@pytest.fixture
def local(tmp_path):
    settings = Settings(data_dir=tmp_path, max_delivery_attempts=3, ack_deadline_seconds=30)
    broker = LocalBroker(settings)
    warehouse = DuckDBWarehouse(settings)
    dead = DeadLetterStore(settings.dead_letter_file)
    yield settings, broker, warehouse, dead, Subscriber(settings, broker, warehouse, dead)
    broker.close()
    warehouse.close()
    dead.close()


def _publish(broker, messages):
    asyncio.run(broker.publish(messages, batch_id=messages[0].attributes["batch_id"]))


def test_local_broker_and_duckdb_apply_in_order(local):
    settings, broker, warehouse, dead, sub = local
    for i in range(3):
        _publish(broker, encode_batch([_insert("t", i), _insert("u", i)], new_batch_id(None)))
    _publish(broker, encode_batch([Activity("delete", "t", ["n"], ["integer"], [1])], new_batch_id(None)))
    with running(sub):
        wait_until(lambda: broker.backlog().messages == 0, "the backlog drained")
    with sub.warehouse_lock:
        assert warehouse.query("SELECT n FROM t ORDER BY n")[1] == [(0,), (2,)]
        assert warehouse.query("SELECT count(*) FROM u")[1] == [(3,)]
    assert sub.totals.messages_acked == 7 and dead.count() == 0


def test_the_tables_of_one_apply_record_their_receipts_in_one_write_before_their_ack(local, tmp_path):
    settings, broker, warehouse, dead, _ = local
    tables = [f"t{i}" for i in range(20)]
    _publish(broker, encode_batch([_insert(t, 1) for t in tables], new_batch_id(None)))
    writes: list[tuple[int, int]] = []  # (outcomes written, messages not yet acked at that moment)
    applies: list[int] = []  # tables per apply_many call

    class Receipts(SqliteReceiptStore):
        def add_outcomes(self, outcomes):
            outcomes = list(outcomes)
            writes.append((len(outcomes), broker.backlog().messages))
            super().add_outcomes(outcomes)

    def apply_many(batches, apply=warehouse.apply_many):
        applies.append(len(batches))
        return apply(batches)

    warehouse.apply_many = apply_many
    receipts = Receipts(tmp_path / "receipts.sqlite")
    try:
        with running(Subscriber(settings, broker, warehouse, dead, receipts)):
            wait_until(lambda: broker.backlog().messages == 0, "the backlog drained")
        assert sum(applies) == len(tables)
        assert [n for n, _ in writes] == applies  # one receipt write per apply, whatever its tables
        assert all(unacked >= n for n, unacked in writes)  # each written before its messages' ack
    finally:
        receipts.close()
    with sqlite3.connect(tmp_path / "receipts.sqlite") as conn:
        recorded = conn.execute("SELECT table_name, rows_applied FROM outcomes ORDER BY table_name").fetchall()
    assert recorded == sorted((t, 1) for t in tables)


def test_local_broker_message_duckdb_refuses_is_dead_lettered_alone(local):
    settings, broker, warehouse, dead, sub = local
    # Bypasses the API's validation: a datetime DuckDB cannot parse, in a format 1 (JSON)
    # message, since format 2 carries a datetime as an Arrow timestamp.
    bad = Activity("insert", "t", ["n", "d"], ["integer", "datetime"], [99, "not a datetime"])
    _publish(broker, encode_batch([_insert("t", 1)], new_batch_id(None)))
    bad_batch = new_batch_id(None)
    _publish(broker, [OutgoingMessage(json_body(bad_batch, "t", [bad]), "t", {
        "table": "t", "count": "1", "batch_id": bad_batch, "dedup_id": f"{bad_batch}:t:0", "key_id": "k-1"})])
    _publish(broker, encode_batch([_insert("t", 2)], new_batch_id(None)))
    with running(sub):
        wait_until(lambda: broker.backlog().messages == 0, "the backlog drained")  # waits out the nack delays
    assert warehouse.query("SELECT n FROM t ORDER BY n")[1] == [(1,), (2,)]
    [letter] = dead.list()
    assert letter.kind == "message" and letter.attempts == settings.max_delivery_attempts
    assert orjson.loads(letter.payload)["activities"][0]["col_values"] == [99, "not a datetime"]
    assert letter.key_id == "k-1"


def test_local_broker_rejected_activity_keeps_its_key_id(local):
    settings, broker, warehouse, dead, sub = local
    _publish(broker, encode_batch([_insert("t", 1)], new_batch_id(None)))
    conflict = encode_batch([Activity("insert", "t", ["n"], ["string"], ["not a number"])], new_batch_id(None))
    for message in conflict:
        message.attributes["key_id"] = "orders-backend"
    _publish(broker, conflict)
    with running(sub):
        wait_until(lambda: broker.backlog().messages == 0, "the backlog drained")
    [letter] = dead.list()
    assert letter.kind == "activity" and letter.key_id == "orders-backend", letter


def test_local_broker_redelivered_message_is_not_applied_twice(local):
    settings, broker, warehouse, dead, sub = local
    messages = encode_batch([_insert("t", 1), _insert("t", 2)], "fixed-batch")
    _publish(broker, messages)
    _publish(broker, messages)  # a re-publish of the same chunk (same dedup_id)
    with running(sub):
        wait_until(lambda: broker.backlog().messages == 0, "the backlog drained")
    assert warehouse.query("SELECT count(*) FROM t")[1] == [(2,)]
    assert sub.totals.duplicates_skipped == 1
