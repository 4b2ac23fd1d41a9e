"""The local broker's group-commit writer: idempotency keys, per-request failures, whole-group
failures, backpressure, concurrent publishers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from app.broker.base import BrokerUnavailable, IdempotencyConflict
from app.broker.local import store
from app.broker.local.writer import GroupCommitWriter
from tests.support.local_broker import count_rows, datas, msg, publish


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
    broker.writer.max_queued_requests = 1
    broker.writer.max_queued_bytes = 1

    async def run():
        return await asyncio.gather(
            *[broker.publish([msg(f"x{i}")], batch_id=f"b{i}") for i in range(50)], return_exceptions=True
        )

    results = asyncio.run(run())
    published = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert published and all(isinstance(r, BrokerUnavailable) for r in refused)
    assert broker.backlog().messages == len(published)


def test_group_whose_transaction_dies_publishes_nothing_of_the_group(broker, monkeypatch):
    """SQLite rolled the whole transaction back (as on SQLITE_FULL): every request in that group fails."""
    real = GroupCommitWriter._insert_rows

    def failing(conn, rows):
        if any(data == b"doomed" for (_, data, _, _) in rows):
            conn.execute("INSERT INTO messages (ordering_key, data, attributes, published_at) VALUES ('x', x'00', '{}', 0)")
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return real(conn, rows)

    monkeypatch.setattr(GroupCommitWriter, "_insert_rows", staticmethod(failing))

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
    monkeypatch.setattr(GroupCommitWriter, "_insert_rows", staticmethod(real))
    publish(broker, msg("later"))  # the writer reconnected and works again
    assert count_rows(broker.path) == sum(r.message_count for r in ok) + 1


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


# ---------------------------------------------------------------- the writer on its own


def test_close_commits_every_queued_publish_then_refuses(tmp_path):
    path = tmp_path / "broker.sqlite"
    store.close_quietly(store.connect(path, synchronous="FULL", busy_timeout=1.0))
    writer = GroupCommitWriter(path, publish_timeout=30.0)

    def publish_one(i: int):
        return writer.publish([msg(f"x{i}")], batch_id=f"b{i}", idempotency_key=None, fingerprint=None)

    async def run():
        tasks = [asyncio.ensure_future(publish_one(i)) for i in range(200)]
        await asyncio.sleep(0)  # every task has queued its request
        await asyncio.to_thread(writer.close)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(BrokerUnavailable):
            await publish_one(999)
        return results

    results = asyncio.run(run())
    assert [r.message_count for r in results] == [1] * 200
    assert count_rows(path) == 200


def test_a_failing_request_in_a_group_with_idempotency_keys_redoes_each_answer(broker):
    """The group is redone request by request: duplicates, conflicts and new keys keep their answers."""
    publish(broker, msg("first"), batch_id="seen", idempotency_key="k1", request_fingerprint="a")
    _add_failing_trigger(broker.path)
    locker = sqlite3.connect(broker.path, isolation_level=None)

    async def run():
        locker.execute("BEGIN IMMEDIATE")  # the requests queue up and are most likely committed as one group
        calls = [
            broker.publish([msg("again")], batch_id="b1", idempotency_key="k1", request_fingerprint="a"),
            broker.publish([msg("other")], batch_id="b2", idempotency_key="k1", request_fingerprint="b"),
            broker.publish([msg("new")], batch_id="b3", idempotency_key="k2", request_fingerprint="x"),
            broker.publish([msg("ok"), msg("bad", "boom")], batch_id="b4", idempotency_key="k3", request_fingerprint="y"),
            broker.publish([msg("new")], batch_id="b5", idempotency_key="k2", request_fingerprint="x"),
            broker.publish([msg("plain")], batch_id="b6"),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.2)
        locker.execute("ROLLBACK")
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        dup, conflict, new, failed, new_again, plain = asyncio.run(run())
    finally:
        locker.close()
    assert dup.duplicate and dup.batch_id == "seen"
    assert isinstance(conflict, IdempotencyConflict)
    assert not new.duplicate and new.batch_id == "b3" and new.message_count == 1
    assert isinstance(failed, BrokerUnavailable)
    assert new_again.duplicate and new_again.batch_id == "b3"
    assert plain.message_count == 1
    assert sorted(datas(broker.pull(100, timeout=5))) == ["first", "new", "plain"]
    # The failed request's key was not kept: it may be retried.
    conn = sqlite3.connect(broker.path)
    try:
        assert conn.execute("SELECT count(*) FROM idempotency_keys WHERE key = 'k3'").fetchone()[0] == 0
    finally:
        conn.close()


def test_many_rows_go_in_in_publish_order(broker):
    big = [msg(f"m{i:03}", f"k{i % 3}") for i in range(300)]  # more rows than one INSERT statement takes

    async def run():
        return await asyncio.gather(
            broker.publish(big, batch_id="big"), broker.publish([msg("small", "k0")], batch_id="small")
        )

    big_result, small_result = asyncio.run(run())
    assert big_result.message_count == 300 and small_result.message_count == 1
    got = broker.pull(1000, timeout=5)
    by_key: dict[str, list[str]] = {}
    for m in got:
        by_key.setdefault(m.ordering_key, []).append(m.data.decode())
    for k in range(3):
        expected = [f"m{i:03}" for i in range(k, 300, 3)]
        assert [d for d in by_key[f"k{k}"] if d != "small"] == expected


def test_a_failing_row_late_in_a_big_request_refuses_all_of_it(broker):
    _add_failing_trigger(broker.path)
    big = [msg(f"m{i:03}") for i in range(300)]
    big[250] = msg("bad", "boom")

    async def run():
        return await asyncio.gather(
            broker.publish(big, batch_id="big"),
            *[broker.publish([msg(f"ok{i}")], batch_id=f"ok{i}") for i in range(5)],
            return_exceptions=True,
        )

    results = asyncio.run(run())
    assert isinstance(results[0], BrokerUnavailable)
    assert all(r.message_count == 1 for r in results[1:])
    assert sorted(datas(broker.pull(1000, timeout=5))) == [f"ok{i}" for i in range(5)]


def test_requests_of_one_loop_iteration_are_committed_as_one_group(broker, monkeypatch):
    """Handed over per loop iteration: the writer never starts on the first of a burst alone."""
    groups: list[int] = []
    real = GroupCommitWriter._commit_group

    def recording(self, group):
        groups.append(len(group))
        return real(self, group)

    monkeypatch.setattr(GroupCommitWriter, "_commit_group", recording)

    async def publish_after_blocking_work(i: int):
        # Work that lets go of the GIL between publishes (as reading and validating a body
        # does): a writer woken by the first request would now commit it alone.
        time.sleep(0.002)
        return await broker.publish([msg(f"m{i}")], batch_id=f"b{i}")

    async def run():
        # gather starts every publish in the same iteration of the loop
        return await asyncio.gather(*[publish_after_blocking_work(i) for i in range(50)])

    results = asyncio.run(run())
    assert [r.message_count for r in results] == [1] * 50
    assert groups == [50]
    assert count_rows(broker.path) == 50


def test_full_queue_counts_staged_requests(broker):
    """Requests staged in this iteration count against the bound before the writer sees them."""
    broker.writer.max_queued_requests = 3

    async def run():
        return await asyncio.gather(
            *[broker.publish([msg(f"x{i}")], batch_id=f"b{i}") for i in range(10)], return_exceptions=True
        )

    results = asyncio.run(run())
    assert [isinstance(r, BrokerUnavailable) for r in results] == [False] * 3 + [True] * 7
    assert count_rows(broker.path) == 3
