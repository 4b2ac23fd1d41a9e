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
import threading
import time
from typing import Sequence

import orjson
import pytest

from app.broker import OutgoingMessage
from app.broker.local import LocalBroker
from app.messages.codec import encode_batch, json_body, new_batch_id
from app.messages.deadletters import DeadLetterStore
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.base import Envelope, TransientWarehouseError
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
