"""Ordering repair on both sides of the Pub/Sub broker (`app.broker.pubsub.ordering`)."""

from __future__ import annotations

from app.broker.base import ReceivedMessage
from app.broker.pubsub.ordering import KeyGate, Lease, PausedKeys


def lease(message_id: str, key: str, nbytes: int = 10, ack_id: str | None = None) -> Lease:
    message = ReceivedMessage(message_id, b"x" * nbytes, {}, key, 1)
    return Lease(ack_id or f"ack-{message_id}", message, 0.0, nbytes=nbytes)


def ids(leases) -> list[str]:
    return [item.message.message_id for item in leases]


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.resumed: list[tuple[str, str]] = []
        self.fail = fail

    def resume_publish(self, topic: str, key: str) -> None:
        if self.fail:
            raise ValueError("stopped")
        self.resumed.append((topic, key))


def test_failed_keys_are_resumed_once_each_and_only_with_ordering():
    publisher = RecordingPublisher()
    PausedKeys("projects/p/topics/t", enabled=True).resume(publisher, ["a", "b", "a", ""])
    assert sorted(publisher.resumed) == [("projects/p/topics/t", "a"), ("projects/p/topics/t", "b")]
    unordered = RecordingPublisher()
    PausedKeys("projects/p/topics/t", enabled=False).resume(unordered, ["a"])
    assert unordered.resumed == []
    PausedKeys("projects/p/topics/t", enabled=True).resume(RecordingPublisher(fail=True), ["a"])  # no raise


def test_take_hands_out_each_key_s_run_in_order_and_marks_it_busy():
    gate = KeyGate()
    for item in (lease("t0", "t"), lease("u0", "u"), lease("t1", "t")):
        assert gate.add(item)
    taken = gate.take(10, 1_000)
    assert ids(taken) == ["t0", "t1", "u0"]
    gate.add(lease("t2", "t"))
    assert gate.take(10, 1_000) == [] and not gate.has_ready()
    for item in taken[:2]:
        gate.release(item)
    assert ids(gate.take(10, 1_000)) == ["t2"]


def test_the_byte_bound_stops_a_run_but_always_gives_one():
    gate = KeyGate()
    for n in range(3):
        gate.add(lease(f"t{n}", "t", nbytes=40))
    assert ids(gate.take(10, 10)) == ["t0"]  # larger than the bound alone: still handed out
    gate2 = KeyGate()
    for n in range(3):
        gate2.add(lease(f"t{n}", "t", nbytes=40))
    assert ids(gate2.take(10, 85)) == ["t0", "t1"]
    assert gate2.waiting_count == 1 and gate2.waiting_bytes == 40


def test_a_redelivery_of_a_waiting_message_replaces_it_instead_of_queueing_a_copy():
    gate = KeyGate()
    gate.add(lease("t0", "t", ack_id="old"))
    assert gate.add(lease("t0", "t", ack_id="new")) is False
    [only] = gate.take(10, 1_000)
    assert only.ack_id == "new" and gate.waiting_count == 0


def test_pop_key_and_pop_copies_take_only_what_they_name():
    gate = KeyGate()
    for item in (lease("t0", "t"), lease("t1", "t"), lease("u0", "u")):
        gate.add(item)
    assert ids(gate.pop_copies("t1", "t")) == ["t1"]
    assert ids(gate.pop_key("t")) == ["t0"]
    assert ids(gate.waiting()) == ["u0"] and gate.waiting_count == 1
