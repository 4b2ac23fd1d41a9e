"""The local broker's lease store: FIFO per key, runs within a byte budget, ack, nack, leases, backlog.

No timing assertions: short ack deadlines / nack delays only make the behaviour show up
quickly; the tests wait for it with generous pull timeouts.
"""

from __future__ import annotations

import time
from pathlib import Path

from app.broker.local.leases import LeaseStore

from tests.support.local_broker import count_rows, datas, msg, publish


# ---------------------------------------------------------------- ordering


def test_fifo_per_key_and_key_blocked_while_leased(broker):
    for i in range(3):
        publish(broker, msg(f"a{i}", "a"))
    [first] = broker.pull(1, timeout=5)
    assert first.data == b"a0"
    # The key has a leased message: nothing more of it is delivered.
    assert broker.pull(10, timeout=0.1) == []
    broker.ack([first])
    assert datas(broker.pull(10, timeout=5)) == ["a1", "a2"]


def test_one_pull_returns_consecutive_messages_of_a_key_in_order(broker):
    publish(broker, *[msg(f"m{i}", "k") for i in range(50)])
    got = broker.pull(500, timeout=5)
    assert datas(got) == [f"m{i}" for i in range(50)]
    assert [int(m.message_id) for m in got] == sorted(int(m.message_id) for m in got)


def test_max_messages_is_respected_and_continues_in_order(broker):
    publish(broker, *[msg(f"m{i}", "k") for i in range(10)])
    first = broker.pull(4, timeout=5)
    assert datas(first) == ["m0", "m1", "m2", "m3"]
    broker.ack(first)
    assert datas(broker.pull(100, timeout=5)) == [f"m{i}" for i in range(4, 10)]


def test_different_keys_interleave(broker):
    publish(broker, msg("a0", "a"), msg("a1", "a"))
    publish(broker, msg("b0", "b"))
    [one] = broker.pull(1, timeout=5)
    assert one.data == b"a0"  # oldest first
    # Key a is blocked, key b is not.
    [two] = broker.pull(1, timeout=5)
    assert two.data == b"b0"
    broker.ack([one])
    assert datas(broker.pull(10, timeout=5)) == ["a1"]


def _by_key(messages) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for m in messages:
        by_key.setdefault(m.ordering_key, []).append(m.data.decode())
    return by_key


def test_a_pull_takes_whole_runs_of_the_keys_waiting_longest(broker):
    # One table apply per run: a pull of long runs over few keys beats one message per key.
    publish(broker, *[msg(f"a{i}", "a") for i in range(4)], *[msg(f"b{i}", "b") for i in range(10)],
            *[msg(f"c{i}", "c") for i in range(3)])
    assert _by_key(broker.pull(6, timeout=5)) == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1"]}
    # a and b are leased now: the next pull starts with the key waiting longest among the rest
    assert _by_key(broker.pull(6, timeout=5)) == {"c": ["c0", "c1", "c2"]}


# ---------------------------------------------------------------- ack / nack / leases


def test_ack_removes(broker):
    publish(broker, msg("x"), msg("y", "other"))
    got = broker.pull(10, timeout=5)
    broker.ack(got)
    assert broker.backlog().messages == 0
    assert broker.pull(10, timeout=0.05) == []
    assert count_rows(broker.path) == 0


def test_nack_redelivers_with_next_attempt(broker):
    publish(broker, msg("x"), msg("y"))
    got = broker.pull(10, timeout=5)
    assert [m.delivery_attempt for m in got] == [1, 1]
    broker.nack(got)
    again = broker.pull(10, timeout=5)
    assert datas(again) == ["x", "y"]
    assert [m.delivery_attempt for m in again] == [2, 2]


def test_nack_with_delay_holds_the_key_back_until_then(broker):
    publish(broker, msg("x"), msg("y"))
    [x] = broker.pull(1, timeout=5)
    broker.nack([x], delay_seconds=60)
    # Delayed head blocks its key (FIFO): y is not delivered before x.
    assert broker.pull(10, timeout=0) == []
    publish(broker, msg("z", "free"))
    assert datas(broker.pull(10, timeout=5)) == ["z"]


def test_nack_with_short_delay_comes_back(broker):
    publish(broker, msg("x"))
    [x] = broker.pull(1, timeout=5)
    broker.nack([x], delay_seconds=0.2)
    [again] = broker.pull(1, timeout=10)
    assert again.data == b"x" and again.delivery_attempt == 2


def test_expired_lease_is_redelivered(make_broker):
    broker = make_broker(ack_deadline_seconds=0.3)
    publish(broker, msg("x"), msg("y"))
    first = broker.pull(10, timeout=5)
    assert [m.delivery_attempt for m in first] == [1, 1]
    again = broker.pull(10, timeout=10)  # not acked: comes back once the lease ends
    assert datas(again) == ["x", "y"]
    assert [m.delivery_attempt for m in again] == [2, 2]


def test_stale_ack_is_ignored(make_broker):
    broker = make_broker(ack_deadline_seconds=0.3)
    publish(broker, msg("x"))
    [old] = broker.pull(1, timeout=5)
    [new] = broker.pull(1, timeout=10)  # re-leased after the first lease expired
    assert new.message_id == old.message_id and new.delivery_attempt == 2
    broker.ack([old])  # the first puller is too late: ignored
    broker.nack([old])  # also ignored
    assert broker.backlog().messages == 1
    broker.ack([new])
    assert broker.backlog().messages == 0


def test_late_ack_of_expired_but_not_released_lease_still_counts(make_broker):
    broker = make_broker(ack_deadline_seconds=0.05)
    publish(broker, msg("x"))
    [m] = broker.pull(1, timeout=5)
    time.sleep(0.1)
    broker.ack([m])
    assert broker.backlog().messages == 0


def test_close_returns_leases(make_broker):
    first = make_broker()
    publish(first, msg("x"))
    [m] = first.pull(1, timeout=5)
    first.close()
    second = make_broker()
    [again] = second.pull(1, timeout=5)
    assert again.message_id == m.message_id and again.delivery_attempt == 2


def test_two_pullers_never_share_a_leased_message(make_broker):
    a, b = make_broker(), make_broker()
    publish(a, *[msg(f"k{k}-{i}", f"k{k}") for k in range(20) for i in range(5)])
    seen: list[str] = []
    for _ in range(40):
        for broker in (a, b):
            got = broker.pull(3, timeout=0)
            seen.extend(datas(got))
            broker.ack(got)
    assert sorted(seen) == sorted(f"k{k}-{i}" for k in range(20) for i in range(5))


# ---------------------------------------------------------------- backlog


def test_backlog_stats(broker):
    empty = broker.backlog()
    assert empty.messages == 0 and empty.oldest_age_seconds is None
    publish(broker, msg("a"), msg("b", "k2"), msg("c"))
    stats = broker.backlog()
    assert stats.messages == 3 and stats.oldest_age_seconds is not None and stats.oldest_age_seconds >= 0
    got = broker.pull(10, timeout=5)
    assert broker.backlog().messages == 3  # leased messages are still unacked
    broker.ack(got[:1])
    assert broker.backlog().messages == 2
    broker.ack(got)
    assert broker.backlog() == type(empty)(messages=0, oldest_age_seconds=None)


# ---------------------------------------------------------------- the lease store on its own


def _lease_store(path: Path, max_pull_bytes: int) -> LeaseStore:
    leases = LeaseStore(path, ack_deadline=30.0)
    leases.max_pull_bytes = max_pull_bytes
    leases.open()
    return leases


def test_pull_stops_at_the_byte_budget_and_continues_in_order(broker):
    publish(broker, *[msg(f"{i}" * 400, "k") for i in range(5)])
    leases = _lease_store(broker.path, max_pull_bytes=1000)
    try:
        first = leases.pull(10, timeout=5)
        assert datas(first) == ["0" * 400, "1" * 400]  # a third would make 1,200 bytes
        leases.ack(first)
        assert datas(leases.pull(10, timeout=5)) == ["2" * 400, "3" * 400]
    finally:
        leases.close()


def test_byte_budget_is_shared_between_keys(broker):
    publish(broker, *[msg(f"a{i}" * 200, "a") for i in range(3)], *[msg(f"b{i}" * 200, "b") for i in range(3)])
    leases = _lease_store(broker.path, max_pull_bytes=1000)
    try:
        got = leases.pull(10, timeout=5)
        assert sum(len(m.data) for m in got) <= 1000 and len(got) == 2
    finally:
        leases.close()


def test_a_message_bigger_than_the_budget_comes_alone(broker):
    publish(broker, msg("x" * 5000, "k"), msg("y", "k"), msg("z", "other"))
    leases = _lease_store(broker.path, max_pull_bytes=1000)
    try:
        [big] = leases.pull(10, timeout=5)
        assert big.data == b"x" * 5000
        leases.ack([big])
        assert sorted(datas(leases.pull(10, timeout=5))) == ["y", "z"]
    finally:
        leases.close()


def test_close_of_one_lease_store_returns_only_its_leases(broker):
    publish(broker, msg("mine", "a"), msg("theirs", "b"))
    mine, theirs = _lease_store(broker.path, 1 << 20), _lease_store(broker.path, 1 << 20)
    try:
        assert datas(mine.pull(1, timeout=5)) == ["mine"]
        assert datas(theirs.pull(1, timeout=5)) == ["theirs"]
        mine.close()
        assert mine.pull(10, timeout=0) == []  # closed: pulls nothing
        [again] = theirs.pull(10, timeout=5)
        assert again.data == b"mine" and again.delivery_attempt == 2
    finally:
        mine.close()
        theirs.close()
