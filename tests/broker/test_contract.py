"""The broker contract, backend-neutral: only the `Broker` interface.

Runs against every backend in conftest's BACKENDS (the local SQLite broker, the
in-memory one of tests/support, Pub/Sub on pstest). What differs between backends is
read from `broker.capabilities` (idempotency keys, backlog, a dead-letter destination
of their own, the shortest ack deadline). pstest does not enforce ordering keys, so
per-key order is asserted only on backends that enforce it (`enforces_ordering`); what
every backend must show (several messages of one key per pull, a busy key held back,
leases, nacks) is asserted on all. No timing assertions beyond "not before the delay":
waits are generous pull timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from app.broker.base import (
    Broker,
    BrokerUnavailable,
    IdempotencyConflict,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)

if TYPE_CHECKING:
    from tests.broker.conftest import BrokerBackend


def msg(key: str, n: int) -> OutgoingMessage:
    return OutgoingMessage(
        data=f"{key}-{n}".encode(), ordering_key=key, attributes={"table": key, "dedup_id": f"b:{key}:{n}", "count": "1"}
    )


def publish(broker: Broker, *messages: OutgoingMessage, batch_id: str = "b") -> None:
    result = asyncio.run(broker.publish(list(messages), batch_id=batch_id))
    assert (result.batch_id, result.message_count, result.duplicate) == (batch_id, len(messages), False)


def pull_until(broker: Broker, count: int, *, timeout: float = 30.0, ack: bool = False) -> list[ReceivedMessage]:
    got: list[ReceivedMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batch = broker.pull(100, 1.0)
        got.extend(batch)
        if ack and batch:
            broker.ack(batch)
    return got


def dedup_ids(messages) -> list[str]:
    return [m.dedup_id for m in messages]


def test_published_messages_are_durable_and_arrive_whole(broker_backend: BrokerBackend):
    before = time.time()
    publisher = broker_backend.make()
    publish(publisher, msg("t", 0), msg("u", 0))
    publisher.close()  # the publisher is gone; the messages are not

    subscriber = broker_backend.make()
    subscriber.start_subscriber()
    got = pull_until(subscriber, 2)
    assert sorted((m.data, m.ordering_key, m.attributes["dedup_id"]) for m in got) == [
        (b"t-0", "t", "b:t:0"), (b"u-0", "u", "b:u:0")
    ]
    assert all(m.message_id and m.delivery_attempt >= 1 for m in got)
    # the broker's publish time in unix seconds, the start of the end-to-end lag (a wide margin:
    # pstest's clock is another process's)
    assert all(m.published_at is not None and before - 60 <= m.published_at <= time.time() + 60 for m in got)


def test_a_one_key_backlog_comes_in_one_pull(broker_backend: BrokerBackend):
    broker = broker_backend.make(pull_max_messages=100)
    backlog = [msg("t", n) for n in range(20)]
    publish(broker, *backlog)
    first = []
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        first = broker.pull(100, 1.0)
    assert sorted(dedup_ids(first)) == sorted(m.attributes["dedup_id"] for m in backlog)
    if broker_backend.enforces_ordering:
        assert dedup_ids(first) == [m.attributes["dedup_id"] for m in backlog]


def test_a_key_with_leased_messages_gives_no_more_until_they_are_settled(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0), msg("t", 1), msg("t", 2))
    first = []
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        first = broker.pull(1, 1.0)
    assert len(first) == 1
    assert broker.pull(10, 2.0) == []  # "t" is busy
    broker.ack(first)
    rest = pull_until(broker, 2)
    assert sorted(dedup_ids(first + rest)) == ["b:t:0", "b:t:1", "b:t:2"]
    if broker_backend.enforces_ordering:
        assert dedup_ids(first + rest) == ["b:t:0", "b:t:1", "b:t:2"]


def test_other_keys_flow_while_one_is_busy(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0))
    held = pull_until(broker, 1)
    publish(broker, msg("t", 1), msg("u", 0))
    got = pull_until(broker, 1, timeout=30)
    assert dedup_ids(got) == ["b:u:0"]
    broker.ack(got + held)
    assert dedup_ids(pull_until(broker, 1)) == ["b:t:1"]


def test_ack_removes_for_every_replica(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0))
    got = pull_until(broker, 1)
    broker.ack(got)
    assert broker.pull(10, 2.0) == []
    other = broker_backend.make()
    assert other.pull(10, 3.0) == []


def test_nack_redelivers_the_message_and_its_key_s_later_ones(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0), msg("t", 1))
    got = pull_until(broker, 2)
    broker.nack(got)
    again = pull_until(broker, 2)
    assert sorted(dedup_ids(again)) == ["b:t:0", "b:t:1"]
    if broker_backend.enforces_ordering:
        assert dedup_ids(again) == ["b:t:0", "b:t:1"]


def test_nack_with_delay_redelivers_after_the_delay_not_before(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0))
    got = pull_until(broker, 1)
    nacked_at = time.monotonic()
    # Pub/Sub hands it back at once; the subscription's retry policy (10 s minimum
    # backoff, provisioned) spaces the redelivery, as the gate in front of pstest enforces.
    broker.nack(got, delay_seconds=6)
    assert broker.pull(10, 1.0) == []
    again = pull_until(broker, 1, timeout=40)
    assert dedup_ids(again) == ["b:t:0"]
    assert time.monotonic() - nacked_at >= 5


def test_an_expired_lease_redelivers_to_another_replica(broker_backend: BrokerBackend):
    # The lease ends: after the ack deadline (local), or once the lease keeper stops
    # extending it at the max lease and Pub/Sub's ack deadline passes (pubsub).
    holder = broker_backend.make()
    lease = max(holder.capabilities.min_ack_deadline_seconds, 1.0)
    holder.close()
    holder = broker_backend.make(ack_deadline_seconds=lease, pubsub_max_lease_seconds=1)
    publish(holder, msg("t", 0))
    held = pull_until(holder, 1)
    assert dedup_ids(held) == ["b:t:0"]
    if holder.capabilities.max_lease_seconds is not None:
        # A lease keeper (Pub/Sub) pulls in the background and would race `other` for
        # every redelivery (Pub/Sub gives a message to any open Pull). Closing stops it
        # and gives back nothing held by the pipeline: the lease still just expires.
        holder.close()
    other = broker_backend.make(ack_deadline_seconds=lease)
    again = pull_until(other, 1, timeout=lease * 4 + 20)
    assert dedup_ids(again) == ["b:t:0"]
    assert again[0].message_id == held[0].message_id


def test_ready_while_open_and_publish_unavailable_once_closed(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    ok, reason = broker.ready()
    assert ok, reason
    broker.close()
    with pytest.raises(BrokerUnavailable):
        publish(broker, msg("t", 0))


def test_a_failed_publish_stores_nothing(broker_backend: BrokerBackend):
    closed = broker_backend.make()
    closed.close()
    with pytest.raises(BrokerUnavailable):
        publish(closed, msg("t", 0), msg("u", 0))
    assert broker_backend.make().pull(10, 2.0) == []


def test_per_key_order_holds_across_publishes(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    for n in range(3):
        publish(broker, msg("t", n), msg("u", n), batch_id=f"b{n}")
    got = pull_until(broker, 6, ack=True)
    per_key = {key: [m.dedup_id for m in got if m.ordering_key == key] for key in ("t", "u")}
    expected = {key: [f"b:{key}:{n}" for n in range(3)] for key in ("t", "u")}
    if broker_backend.enforces_ordering:
        assert per_key == expected
    else:
        assert {key: sorted(ids) for key, ids in per_key.items()} == expected


def test_each_delivery_counts_an_attempt(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0))
    [first] = pull_until(broker, 1)
    broker.nack([first])
    [second] = pull_until(broker, 1)
    assert second.message_id == first.message_id
    assert first.delivery_attempt >= 1
    if broker_backend.counts_attempts:
        assert second.delivery_attempt == first.delivery_attempt + 1


def test_a_repeated_idempotency_key(broker_backend: BrokerBackend):
    broker = broker_backend.make()

    def publish_keyed(body: OutgoingMessage, fingerprint: str) -> PublishResult:
        return asyncio.run(broker.publish([body], batch_id="b1", idempotency_key="key", request_fingerprint=fingerprint))

    assert publish_keyed(msg("t", 0), "fp") == PublishResult("b1", 1)
    again = publish_keyed(msg("t", 0), "fp")
    if broker.capabilities.remembers_idempotency_keys:
        assert again == PublishResult("b1", 0, duplicate=True)
        with pytest.raises(IdempotencyConflict):
            publish_keyed(msg("t", 1), "another fingerprint")
        assert dedup_ids(pull_until(broker, 1, ack=True)) == ["b:t:0"]
        assert broker.pull(10, 2.0) == []
    else:  # published again: the copy carries the same dedup id, which the warehouse drops
        assert again == PublishResult("b1", 1)
        assert dedup_ids(pull_until(broker, 2, ack=True)) == ["b:t:0", "b:t:0"]


def test_backlog_counts_what_waits(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    if not broker.capabilities.reports_backlog:
        assert broker.backlog() is None
        return
    assert broker.backlog().messages == 0
    publish(broker, msg("t", 0), msg("t", 1), msg("u", 0))
    stats = broker.backlog()
    assert stats.messages == 3 and stats.oldest_age_seconds is not None and stats.oldest_age_seconds >= 0
    pull_until(broker, 3, ack=True)
    assert broker.backlog().messages == 0


def test_forwarded_dead_letters_reach_the_broker_s_own_destination(broker_backend: BrokerBackend):
    broker = broker_backend.make()
    publish(broker, msg("t", 0))
    [received] = pull_until(broker, 1)
    broker.forward_dead_letters([(received, "undecodable: not JSON")])
    broker.ack([received])
    source = broker.dead_letter_source()
    if not broker.capabilities.has_dead_letter_destination:
        assert source is None
        return
    try:
        [letter] = source.list(10)
    finally:
        source.close()
    assert (letter.data, letter.table, letter.reason) == (b"t-0", "t", "undecodable: not JSON")
    assert letter.forwarded_by_pipeline and letter.attributes["dedup_id"] == "b:t:0"
