"""The embedded SQLite broker: durability, Pub/Sub semantics, idempotency, multi-process use.

No timing assertions: short ack deadlines / nack delays only make the behaviour show up
quickly; the tests wait for it with generous pull timeouts.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.broker.base import BrokerUnavailable, IdempotencyConflict, OutgoingMessage
from app.broker.local import LocalBroker
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def msg(data: str, key: str = "t", **attributes: str) -> OutgoingMessage:
    return OutgoingMessage(data=data.encode(), ordering_key=key, attributes={"dedup_id": data, **attributes})


@pytest.fixture
def make_broker(tmp_path):
    brokers: list[LocalBroker] = []

    def make(**overrides) -> LocalBroker:
        overrides.setdefault("ack_deadline_seconds", 30.0)
        broker = LocalBroker(Settings(data_dir=tmp_path, **overrides))
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def broker(make_broker) -> LocalBroker:
    return make_broker()


def publish(broker: LocalBroker, *messages: OutgoingMessage, batch_id: str = "b", **kw):
    return asyncio.run(broker.publish(list(messages), batch_id=batch_id, **kw))


def datas(messages) -> list[str]:
    return [m.data.decode() for m in messages]


def count_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


# ---------------------------------------------------------------- basics


def test_publish_then_pull_returns_data_attributes_and_key(broker):
    result = publish(broker, msg("a1", "alpha", table="alpha", count="3"), batch_id="batch-1")
    assert result.batch_id == "batch-1" and result.message_count == 1 and not result.duplicate

    [m] = broker.pull(10, timeout=5)
    assert m.data == b"a1"
    assert m.attributes == {"dedup_id": "a1", "table": "alpha", "count": "3"}
    assert m.ordering_key == "alpha"
    assert m.delivery_attempt == 1
    assert m.dedup_id == "a1"
    assert m.message_id.isdigit()


def test_empty_publish_without_key_is_a_no_op(broker):
    result = publish(broker)
    assert result.message_count == 0 and not result.duplicate
    assert broker.pull(10, timeout=0) == []


def test_messages_survive_a_restart(make_broker):
    first = make_broker()
    publish(first, msg("kept"))
    first.close()
    second = make_broker()
    assert datas(second.pull(10, timeout=5)) == ["kept"]


def test_ready(broker):
    assert broker.ready() == (True, "ok")


def test_pull_with_nothing_waits_and_returns_empty(broker):
    assert broker.pull(10, timeout=0.05) == []
    assert broker.pull(0, timeout=0) == []


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


def test_one_pull_shares_between_keys(broker):
    publish(broker, *[msg(f"a{i}", "a") for i in range(10)], *[msg(f"b{i}", "b") for i in range(10)])
    got = broker.pull(6, timeout=5)
    by_key: dict[str, list[str]] = {}
    for m in got:
        by_key.setdefault(m.ordering_key, []).append(m.data.decode())
    assert by_key == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}


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


# ---------------------------------------------------------------- idempotency


def test_idempotency_duplicate_returns_stored_batch_and_publishes_nothing(broker):
    first = publish(broker, msg("x"), batch_id="b1", idempotency_key="key-1", request_fingerprint="fp")
    assert first == type(first)(batch_id="b1", message_count=1, duplicate=False)
    second = publish(broker, msg("x"), batch_id="b2", idempotency_key="key-1", request_fingerprint="fp")
    assert second.duplicate and second.batch_id == "b1" and second.message_count == 0
    assert broker.backlog().messages == 1


def test_idempotency_conflict(broker):
    publish(broker, msg("x"), batch_id="b1", idempotency_key="key-1", request_fingerprint="fp1")
    with pytest.raises(IdempotencyConflict):
        publish(broker, msg("y"), batch_id="b2", idempotency_key="key-1", request_fingerprint="fp2")
    assert broker.backlog().messages == 1


def test_idempotency_same_key_in_one_group(broker):
    async def both():
        return await asyncio.gather(
            *[
                broker.publish([msg(f"x{i}")], batch_id=f"b{i}", idempotency_key="k", request_fingerprint="fp")
                for i in range(10)
            ]
        )

    results = asyncio.run(both())
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.batch_id for r in results}) == 1
    assert broker.backlog().messages == 1


def test_expired_idempotency_key_is_reusable(broker):
    publish(broker, msg("x"), batch_id="b1", idempotency_key="old", request_fingerprint="fp1")
    conn = sqlite3.connect(broker.path)
    conn.execute("UPDATE idempotency_keys SET created_at = created_at - 25 * 3600")
    conn.commit()
    conn.close()
    result = publish(broker, msg("y"), batch_id="b2", idempotency_key="old", request_fingerprint="fp2")
    assert not result.duplicate and result.batch_id == "b2"


# ---------------------------------------------------------------- failures


def _add_failing_trigger(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.ordering_key = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    conn.commit()
    conn.close()


def test_failed_request_publishes_nothing_and_others_in_its_group_commit(broker):
    _add_failing_trigger(broker.path)

    async def run():
        return await asyncio.gather(
            broker.publish([msg("ok-1"), msg("bad-1"), msg("bad-2", "boom"), msg("bad-3")], batch_id="bad",
                           idempotency_key="bad-key", request_fingerprint="fp"),
            *[broker.publish([msg(f"good-{i}")], batch_id=f"g{i}") for i in range(20)],
            return_exceptions=True,
        )

    results = asyncio.run(run())
    assert isinstance(results[0], BrokerUnavailable)
    assert all(not isinstance(r, BaseException) for r in results[1:])
    delivered = datas(broker.pull(100, timeout=5))
    assert sorted(delivered) == sorted(f"good-{i}" for i in range(20))
    # The failed request's idempotency key was not recorded either: a retry goes through.
    conn = sqlite3.connect(broker.path)
    conn.execute("DROP TRIGGER boom")
    conn.commit()
    conn.close()
    retry = publish(broker, msg("ok-1"), msg("bad-1"), batch_id="bad", idempotency_key="bad-key",
                    request_fingerprint="fp")
    assert not retry.duplicate and retry.message_count == 2


def test_locked_file_gives_unavailable_then_recovers(make_broker):
    broker = make_broker(publish_timeout_seconds=1.0)
    publish(broker, msg("before"))
    locker = sqlite3.connect(broker.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(BrokerUnavailable):
            publish(broker, msg("during"))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    publish(broker, msg("after"))
    assert datas(broker.pull(10, timeout=5)) == ["before", "after"]


def test_full_queue_gives_unavailable(broker):
    broker.max_queued_requests = 1
    broker.max_queued_bytes = 1

    async def run():
        return await asyncio.gather(
            *[broker.publish([msg(f"x{i}")], batch_id=f"b{i}") for i in range(50)], return_exceptions=True
        )

    results = asyncio.run(run())
    published = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert published and all(isinstance(r, BrokerUnavailable) for r in refused)
    assert broker.backlog().messages == len(published)


def test_publish_after_close_is_unavailable(broker):
    broker.close()
    with pytest.raises(BrokerUnavailable):
        publish(broker, msg("x"))


# ---------------------------------------------------------------- concurrency


def test_concurrent_publishers_are_all_durable(broker):
    async def run():
        return await asyncio.gather(
            *[broker.publish([msg(f"r{i}-{j}", f"k{i % 7}") for j in range(3)], batch_id=f"b{i}") for i in range(300)]
        )

    results = asyncio.run(run())
    assert all(r.message_count == 3 for r in results)
    # Counted through an independent connection: the rows are committed.
    assert count_rows(broker.path) == 900


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, threading, time
    from pathlib import Path
    from app.broker.base import OutgoingMessage
    from app.broker.local import LocalBroker
    from app.settings import Settings

    data_dir, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    broker = LocalBroker(Settings(data_dir=data_dir, ack_deadline_seconds=60))
    received = []

    async def produce():
        for i in range(0, n, 10):
            await asyncio.gather(*[
                broker.publish([OutgoingMessage(f"{name}-{j}".encode(), f"k{j % 5}", {"dedup_id": f"{name}-{j}"})],
                               batch_id=f"{name}-{j}")
                for j in range(i, min(n, i + 10))
            ])
        (data_dir / f"{name}.done").touch()

    producer = threading.Thread(target=lambda: asyncio.run(produce()))
    producer.start()
    idle_since = None
    while True:
        got = broker.pull(7, timeout=0.05)
        received.extend((m.ordering_key, int(m.message_id), m.data.decode()) for m in got)
        broker.ack(got)
        if got:
            idle_since = None
            continue
        finished = len(list(data_dir.glob("*.done"))) == 2 and broker.backlog().messages == 0
        if finished:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.3:
                break
    producer.join()
    broker.close()
    (data_dir / f"{name}.json").write_text(json.dumps(received))
    """
)


def test_two_processes_publish_and_pull_lose_and_duplicate_nothing(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n = 400
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), name, str(n)],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for name in ("p1", "p2")
    ]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    received = [tuple(r) for name in ("p1", "p2") for r in json.loads((tmp_path / f"{name}.json").read_text())]
    payloads = [r[2] for r in received]
    assert len(payloads) == 2 * n
    assert set(payloads) == {f"{name}-{j}" for name in ("p1", "p2") for j in range(n)}
    # Each process sees every key's messages in publish order.
    for name in ("p1", "p2"):
        per_key: dict[str, list[int]] = {}
        for key, message_id, _ in json.loads((tmp_path / f"{name}.json").read_text()):
            per_key.setdefault(key, []).append(message_id)
        assert all(ids == sorted(ids) for ids in per_key.values())
    assert count_rows(tmp_path / "broker.sqlite") == 0


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


def test_group_whose_transaction_dies_publishes_nothing_of_the_group(broker, monkeypatch):
    """SQLite rolled the whole transaction back (as on SQLITE_FULL): every request in that group fails."""
    real = LocalBroker._write_one

    def failing(conn, request, now):
        if request.batch_id == "doomed":
            conn.execute("INSERT INTO messages (ordering_key, data, attributes, published_at) VALUES ('x', x'00', '{}', 0)")
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return real(conn, request, now)

    monkeypatch.setattr(LocalBroker, "_write_one", staticmethod(failing))

    async def run():
        return await asyncio.gather(
            *[broker.publish([msg(f"a{i}"), msg(f"b{i}", "k2")], batch_id=f"g{i}") for i in range(10)],
            broker.publish([msg("doomed")], batch_id="doomed"),
            *[broker.publish([msg(f"c{i}")], batch_id=f"h{i}") for i in range(10)],
            return_exceptions=True,
        )

    results = asyncio.run(run())
    assert isinstance(results[10], BrokerUnavailable)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, BrokerUnavailable) for r in results if isinstance(r, BaseException))
    # Exactly the acknowledged publishes are in the file, nothing of the failed group(s).
    assert count_rows(broker.path) == sum(r.message_count for r in ok)
    monkeypatch.setattr(LocalBroker, "_write_one", staticmethod(real))
    publish(broker, msg("later"))  # the writer reconnected and works again
    assert count_rows(broker.path) == sum(r.message_count for r in ok) + 1
