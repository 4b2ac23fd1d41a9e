"""PubSubBroker against Google's pstest fake over the wire (few messages: pstest is slow).

pstest enforces neither ordering keys nor dead-letter policies and does not set
`delivery_attempt`; the per-key gate and lease keeper are tested with a fake client in
test_pubsub_pull.py, the behaviour shared with the local broker in test_contract.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest

from app.broker.base import BrokerUnavailable, OutgoingMessage
from app.broker.pubsub import PubSubBroker
from app.provision import provision_pubsub
from app.settings import Settings
from tests.support.pstest import EmulatorUnavailable, start_pstest, unavailable

pytestmark = pytest.mark.emulator


def make_settings(**overrides) -> Settings:
    name = uuid.uuid4().hex[:8]
    values = dict(
        broker="pubsub",
        gcp_project="test-project",
        pubsub_topic=f"topic-{name}",
        pubsub_subscription=f"sub-{name}",
        ack_deadline_seconds=10,
        publish_timeout_seconds=5,
        pull_max_messages=50,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(pubsub_emulator) -> Settings:
    s = make_settings()
    provision_pubsub(s)
    return s


@pytest.fixture
def broker(settings):
    b = PubSubBroker(settings)
    yield b
    b.close()


def msg(table: str, n: int) -> OutgoingMessage:
    return OutgoingMessage(
        data=f'{{"table": "{table}", "n": {n}}}'.encode(),
        ordering_key=table,
        attributes={"table": table, "dedup_id": f"b:{table}:{n}", "count": "1"},
    )


def pull_until(broker: PubSubBroker, count: int, timeout: float = 20.0, ack: bool = True):
    """Pull until `count` arrived, acking as we go unless told not to (a busy key gives no more)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batch = broker.pull(10, 0.5)
        got.extend(batch)
        if ack and batch:
            broker.ack(batch)
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_then_pull_returns_data_attributes_and_key(broker):
    messages = [msg("a", 0), msg("b", 0), msg("a", 1)]
    result = asyncio.run(broker.publish(messages, batch_id="batch-1"))
    assert (result.batch_id, result.message_count, result.duplicate) == ("batch-1", 3, False)

    broker.start_subscriber()
    got = pull_until(broker, 3)
    assert sorted(m.data for m in got) == sorted(m.data for m in messages)
    for m in got:
        table = m.attributes["table"]
        assert m.ordering_key == table
        assert m.attributes["dedup_id"].startswith(f"b:{table}:")
        assert m.dedup_id == m.attributes["dedup_id"]
        assert m.delivery_attempt == 1
        assert m.message_id
    # pstest does not deliver in key order, but its ids ("m<N>") follow arrival order:
    # the publisher sent key "a" in order.
    a_sent = sorted((m for m in got if m.ordering_key == "a"), key=lambda m: int(m.message_id.lstrip("m")))
    assert [m.dedup_id for m in a_sent] == ["b:a:0", "b:a:1"]


def test_empty_publish_is_a_no_op(broker):
    assert asyncio.run(broker.publish([], batch_id="x")).message_count == 0


def test_nack_redelivers_quickly_and_ack_removes(broker):
    asyncio.run(broker.publish([msg("t", 0)], batch_id="b"))
    first = pull_until(broker, 1, ack=False)
    assert len(first) == 1
    broker.nack(first)

    again = pull_until(broker, 1, ack=False)
    assert [m.dedup_id for m in again] == ["b:t:0"]
    broker.ack(again)

    # Acked: not delivered again, neither to this stream nor to a fresh subscriber.
    assert broker.pull(10, 2.0) == []
    broker.close()
    fresh = PubSubBroker(broker.settings)
    try:
        assert fresh.pull(10, 3.0) == []
    finally:
        fresh.close()


def test_a_nack_with_a_delay_hands_the_message_back_for_redelivery(broker):
    # Handed back at once whatever the delay: the subscription's retry policy spaces the
    # redelivery (pstest ignores it; the Google-behaviour gate in test_contract.py does not).
    asyncio.run(broker.publish([msg("t", 0)], batch_id="b"))
    first = pull_until(broker, 1, ack=False)
    broker.nack(first, delay_seconds=3)
    again = pull_until(broker, 1, timeout=20, ack=False)
    assert [m.dedup_id for m in again] == ["b:t:0"]
    broker.ack(again)


def test_unacked_messages_return_to_a_new_subscriber_after_close(broker):
    asyncio.run(broker.publish([msg("t", 0)], batch_id="b"))
    assert broker.start_subscriber() is None
    # Wait until the puller holds the message but do not take it.
    deadline = time.monotonic() + 15
    while broker._puller._gate.waiting_count == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker._puller._gate.waiting_count == 1
    broker.close()  # nacks what nobody pulled
    fresh = PubSubBroker(broker.settings)
    try:
        got = pull_until(fresh, 1)
        assert [m.dedup_id for m in got] == ["b:t:0"]
    finally:
        fresh.close()


def test_ready_true_with_topic_false_without(broker, pubsub_emulator):
    assert broker.ready() == (True, "ok")
    missing = PubSubBroker(make_settings())  # never provisioned
    try:
        ok, reason = missing.ready()
        assert not ok and reason == f"{missing.topic_path} does not exist"
    finally:
        missing.close()


def test_subscriber_readiness_checks_the_subscription_once_pulling(broker, pubsub_emulator):
    broker.start_subscriber()
    assert broker.ready() == (True, "ok")
    missing = PubSubBroker(make_settings())
    try:
        missing.start_subscriber()
        with pytest.raises(BrokerUnavailable, match="NotFound"):
            missing.pull(10, 5.0)
        ok, reason = missing.ready()
        assert not ok and "NotFound" in reason
    finally:
        missing.close()


def test_unreachable_broker_is_unavailable_within_the_timeout(monkeypatch, pubsub_emulator):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    b = PubSubBroker(make_settings(publish_timeout_seconds=2))
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            asyncio.run(b.publish([msg("a", 0), msg("b", 0)], batch_id="b"))
        assert time.monotonic() - started < 6
        started = time.monotonic()
        ok, _ = b.ready()
        assert not ok and time.monotonic() - started < 6
        b.start_subscriber()  # no call at start: the failing Pull shows in pull()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            b.pull(10, 10.0)
        assert time.monotonic() - started < 10
    finally:
        b.close()


def test_emulator_stopping_mid_run_gives_unavailable_then_recovers_keys(monkeypatch, pubsub_emulator):
    """Own emulator so it can be killed: publish works, then fails fast, never hangs."""
    try:
        cm = start_pstest()
        address, proc = cm.__enter__()
    except EmulatorUnavailable as exc:
        unavailable(str(exc))
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", address)
        s = make_settings(publish_timeout_seconds=2)
        provision_pubsub(s)
        b = PubSubBroker(s)
        try:
            assert asyncio.run(b.publish([msg("a", 0)], batch_id="one")).message_count == 1
            proc.kill()
            proc.wait(timeout=5)
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                asyncio.run(b.publish([msg("a", 1), msg("a", 2)], batch_id="two"))
            assert time.monotonic() - started < 6
            assert b.ready()[0] is False
        finally:
            b.close()
    finally:
        cm.__exit__(None, None, None)


def test_publish_after_close_is_unavailable(broker):
    broker.close()
    with pytest.raises(BrokerUnavailable):
        asyncio.run(broker.publish([msg("a", 0)], batch_id="b"))
    assert broker.ready()[0] is False


def test_emulator_trouble_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(EmulatorUnavailable, match="CI=true"):
        unavailable("no go toolchain")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no go toolchain"):
        unavailable("no go toolchain")


def test_forwarded_dead_letter_reaches_the_dead_letter_subscription(settings, broker):
    asyncio.run(broker.publish([msg("t", 1)], batch_id="b"))
    [received] = pull_until(broker, 1, ack=False)
    broker.forward_dead_letters([(received, "undecodable: not JSON")])
    broker.ack([received])

    dead = PubSubBroker(
        settings.model_copy(update={"pubsub_subscription": f"{settings.pubsub_subscription}-dead-letter"})
    )
    try:
        [letter] = pull_until(dead, 1)
    finally:
        dead.close()
    assert letter.data == received.data
    assert letter.attributes["dead_letter_reason"] == "undecodable: not JSON"
    assert letter.attributes["dead_letter_source_message_id"] == received.message_id
    assert letter.attributes["dedup_id"] == "b:t:1"
