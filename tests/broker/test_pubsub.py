"""PubSubBroker against Google's pstest fake over the wire (few messages: pstest is slow).

pstest enforces neither ordering keys nor dead-letter policies and does not set
`delivery_attempt`; the ordering repair after a nack is tested with fake messages.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from types import SimpleNamespace

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
    """Pull (acking as we go, since ordering hands out one message per key) until `count` arrived."""
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


def test_delayed_nack_comes_back_after_the_delay(broker):
    asyncio.run(broker.publish([msg("t", 0)], batch_id="b"))
    first = pull_until(broker, 1, ack=False)
    started = time.monotonic()
    broker.nack(first, delay_seconds=3)
    assert broker.pull(10, 1.5) == []
    again = pull_until(broker, 1, timeout=20, ack=False)
    assert [m.dedup_id for m in again] == ["b:t:0"]
    assert time.monotonic() - started >= 2.5
    broker.ack(again)


def test_unacked_messages_return_to_a_new_subscriber_after_close(broker):
    asyncio.run(broker.publish([msg("t", 0)], batch_id="b"))
    assert broker.start_subscriber() is None
    # Wait until the stream has handed the message to us but do not take it.
    deadline = time.monotonic() + 15
    while broker._queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)
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
        with pytest.raises(BrokerUnavailable):
            b.start_subscriber()
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


# --- ordering repair after a nack (no emulator: pstest does not enforce ordering) ---


class FakeMessage(SimpleNamespace):
    def __init__(self, message_id: str, key: str):
        super().__init__(
            message_id=message_id,
            data=b"x",
            attributes={"dedup_id": message_id},
            ordering_key=key,
            delivery_attempt=None,
            calls=[],
        )

    def nack(self):
        self.calls.append("nack")

    def ack(self):
        self.calls.append("ack")

    def modify_ack_deadline(self, seconds):
        self.calls.append(f"modack {seconds}")

    def drop(self):
        self.calls.append("drop")


def fake_broker() -> PubSubBroker:
    b = PubSubBroker(make_settings())
    b._streaming = SimpleNamespace(done=lambda: False)  # pretend the stream is open
    return b


def test_after_a_nack_later_messages_of_the_key_are_given_back_until_it_returns():
    b = fake_broker()
    m1, m2, other = FakeMessage("1", "a"), FakeMessage("2", "a"), FakeMessage("3", "b")
    b._queue.put(m1)
    [r1] = b.pull(10, 0.1)
    assert r1.delivery_attempt == 1 and r1.handle is m1
    b.nack([r1], delay_seconds=5)
    assert m1.calls == ["modack 5", "drop"]

    # The library hands over the key's next message at once: it must not overtake m1.
    b._queue.put(m2)
    b._queue.put(other)
    assert [m.message_id for m in b.pull(10, 0.1)] == ["3"]
    assert m2.calls == ["nack"]

    # m1's redelivery unblocks the key.
    b._queue.put(FakeMessage("1", "a"))
    b._queue.put(FakeMessage("2", "a"))
    assert [m.message_id for m in b.pull(10, 0.1)] == ["1", "2"]


def test_nack_delay_is_clamped_and_zero_means_plain_nack():
    b = fake_broker()
    m1, m2 = FakeMessage("1", ""), FakeMessage("2", "")
    b._queue.put(m1)
    b._queue.put(m2)
    r1, r2 = b.pull(10, 0.1)
    b.nack([r1], delay_seconds=10_000)
    b.nack([r2], delay_seconds=-3)
    assert m1.calls == ["modack 600", "drop"]
    assert m2.calls == ["nack"]
    assert b._blocked == {}


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
