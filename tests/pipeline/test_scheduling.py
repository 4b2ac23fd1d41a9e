"""Per-table queues, flow control and terminal-failure counts, without threads."""

from __future__ import annotations

import time

from app.broker.base import ReceivedMessage
from app.pipeline.scheduling import Held, Scheduler, TerminalFailures
from app.warehouse.base import Envelope


def _held(message_id: str, table: str = "t", size: int = 10) -> Held:
    message = ReceivedMessage(message_id, b"x" * size, {"dedup_id": f"b:{table}:{message_id}"}, table, 1)
    return Held(message, Envelope(message.dedup_id, table, []), time.monotonic())


def _scheduler(**values) -> Scheduler:
    return Scheduler(**{"max_messages": 100, "max_bytes": 10_000, "initial_backoff": 0.2, **values})


def test_a_table_is_claimed_once_and_comes_back_while_it_holds_messages():
    s = _scheduler()
    s.hold("t", [_held("1")], s.begin_pull())
    s.hold("t", [_held("2")], s.begin_pull())
    queue = s.next_table()
    assert queue is not None and queue.name == "t" and queue.claimed
    assert [h.message.message_id for h in s.batch(queue, 10, 10_000)] == ["1", "2"]
    s.done(queue, 1)
    s.finish(queue, None)  # "2" still held: due again
    assert s.next_table() is queue
    s.done(queue, 1)
    s.finish(queue, None)
    assert not queue.claimed and s.outstanding_messages == 0 and s.outstanding_bytes == 0


def test_batch_keeps_to_both_bounds_but_takes_at_least_one():
    s = _scheduler()
    s.hold("t", [_held(str(i), size=100) for i in range(5)], s.begin_pull())
    queue = s.next_table()
    assert len(s.batch(queue, 3, 10_000)) == 3
    assert len(s.batch(queue, 10, 250)) == 2
    assert len(s.batch(queue, 10, 1)) == 1


def test_flow_control_has_no_room_until_messages_are_settled():
    s = _scheduler(max_messages=2)
    s.hold("t", [_held("1"), _held("2")], s.begin_pull())
    assert s.wait_for_room(0) == 0
    queue = s.next_table()
    s.done(queue, 1)
    assert s.wait_for_room(0) == 1


def test_messages_pulled_while_their_table_was_released_are_handed_back():
    s = _scheduler()
    s.hold("t", [_held("1")], s.begin_pull())
    queue = s.next_table()
    in_flight = s.begin_pull()
    assert [h.message.message_id for h in s.release(queue, 5.0)] == ["1"]
    # "2" may have been pulled before the nack of "1" reached the broker: it must not overtake it.
    late, delay, why = s.hold("t", [_held("2")], in_flight)
    assert [h.message.message_id for h in late] == ["2"] and delay == 5.0 and why == "ordering"
    # A pull that holds "1" again happened after the nack: in order.
    late, _, _ = s.hold("t", [_held("1"), _held("2")], in_flight)
    assert late == []



def test_a_table_holds_only_its_share_and_hands_back_the_newest_beyond_it():
    s = _scheduler(max_messages=6, max_messages_per_table=3)
    back, delay, why = s.hold("busy", [_held(str(i), "busy") for i in range(5)], s.begin_pull())
    assert [h.message.message_id for h in back] == ["3", "4"] and why == "table_full" and delay > 0
    back, _, _ = s.hold("busy", [_held("5", "busy")], s.begin_pull())
    assert [h.message.message_id for h in back] == ["5"]
    # The other tables still have room in the window.
    assert s.held_by_table() == {"busy": 3} and s.wait_for_room(0) == 3
    back, _, _ = s.hold("other", [_held("6", "other")], s.begin_pull())
    assert back == [] and s.held_by_table() == {"busy": 3, "other": 1}

def test_release_waiting_takes_only_tables_waiting_long_enough():
    s = _scheduler()
    s.hold("long", [_held("1", "long")], s.begin_pull())
    s.hold("short", [_held("2", "short")], s.begin_pull())
    first, second = s.next_table(), s.next_table()
    by_name = {first.name: first, second.name: second}
    s.finish(by_name["long"], time.monotonic() + 60)
    s.finish(by_name["short"], time.monotonic() + 0.1)
    [(table, items, delay)] = s.release_waiting(min_wait=1.0)
    assert table == "long" and [h.message.message_id for h in items] == ["1"] and 50 < delay <= 60
    assert not by_name["long"].claimed and s.outstanding_messages == 1
    assert s.next_table() is by_name["short"]  # still due at its own time


def test_stop_wakes_workers_and_drain_returns_everything_held():
    s = _scheduler()
    s.hold("a", [_held("1", "a")], s.begin_pull())
    s.hold("b", [_held("2", "b")], s.begin_pull())
    s.stop()
    assert s.next_table() is None
    assert sorted(h.message.message_id for h in s.drain()) == ["1", "2"]
    assert s.outstanding_messages == 0


def test_terminal_failures_are_counted_per_dedup_id_and_bounded():
    failures = TerminalFailures(capacity=2)
    assert failures.record("a") == 1 and failures.record("a") == 2
    failures.record("b")
    failures.record("c")  # "a" is the least recently failed: forgotten
    assert failures.record("a") == 1
    failures.forget(["a"])
    assert failures.record("a") == 1
