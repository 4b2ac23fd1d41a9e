"""The broker contract, backend-neutral: only the `Broker` interface.

Runs against every backend in conftest's BACKENDS (the local SQLite broker, Pub/Sub on
pstest). pstest does not enforce ordering keys, so per-key order is asserted only on
backends that enforce it (`enforces_ordering`); what every backend must show (several
messages of one key per pull, a busy key held back, leases, nacks) is asserted on all.
No timing assertions beyond "not before the delay": waits are generous pull timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from app.broker.base import Broker, BrokerUnavailable, OutgoingMessage, ReceivedMessage

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
    broker.nack(got, delay_seconds=6)
    assert broker.pull(10, 1.0) == []
    again = pull_until(broker, 1, timeout=40)
    assert dedup_ids(again) == ["b:t:0"]
    assert time.monotonic() - nacked_at >= 5


def test_an_expired_lease_redelivers_to_another_replica(broker_backend: BrokerBackend):
    # The lease ends: after the ack deadline (local), or once the lease keeper stops
    # extending it at the max lease and Pub/Sub's ack deadline passes (pubsub).
    lease = broker_backend.min_ack_deadline
    holder = broker_backend.make(ack_deadline_seconds=lease, pubsub_max_lease_seconds=1)
    publish(holder, msg("t", 0))
    held = pull_until(holder, 1)
    assert dedup_ids(held) == ["b:t:0"]
    if broker_backend.name == "pubsub":
        # Its background Pull would race `other` for every redelivery (Pub/Sub gives a
        # message to any open Pull). Closing stops it and gives back nothing held by the
        # pipeline: the lease still just expires.
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
