"""The local broker's file: delivery state apart from message bodies, set-based pulls and
acks, and the upgrade of a file written by the previous schema (version 1)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from app.broker.base import ReceivedMessage
from app.broker.local import LocalBroker, store
from app.settings import Settings

from tests.support.local_broker import count_rows, datas, msg, publish

# Schema version 1, as the previous code wrote it: delivery state inside the message row.
_V1_SCHEMA = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ordering_key TEXT NOT NULL, data BLOB NOT NULL,
    attributes TEXT NOT NULL, published_at REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, lease_token INTEGER
);
CREATE INDEX messages_key_id ON messages (ordering_key, id);
CREATE INDEX messages_key_not_before ON messages (ordering_key, not_before);
CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY, batch_id TEXT NOT NULL, fingerprint TEXT, created_at REAL NOT NULL
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
PRAGMA user_version = 1;
"""


def _write_v1_file(path: Path, rows: list[tuple[str, str, float, int, int | None]]) -> None:
    """rows: (data, key, not_before, attempts, lease_token)."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_V1_SCHEMA)
        conn.execute("PRAGMA journal_mode = WAL")
        for data, key, not_before, attempts, token in rows:
            conn.execute(
                "INSERT INTO messages (ordering_key, data, attributes, published_at, not_before, attempts, lease_token)"
                " VALUES (?, ?, '{}', ?, ?, ?, ?)",
                (key, data.encode(), time.time(), not_before, attempts, token),
            )
        conn.commit()
    finally:
        conn.close()


def test_a_version_1_file_is_migrated_on_open_keeping_leases_attempts_and_order(tmp_path, make_broker):
    leased_until = time.time() + 3600
    _write_v1_file(
        tmp_path / "broker.sqlite",
        [
            ("a0", "a", leased_until, 1, 77),  # leased by a subscriber before the upgrade
            ("a1", "a", 0, 0, None),
            ("b0", "b", 1.0, 2, None),  # nacked twice, its delay long over
            ("b1", "b", 0, 0, None),
            ("c0", "c", 0, 0, None),
        ],
    )
    broker = make_broker()
    publish(broker, msg("c1", "c"))

    got = broker.pull(10, timeout=5)
    # Key a is still blocked by its old lease; b's head keeps its delivery count.
    assert sorted(datas(got)) == ["b0", "b1", "c0", "c1"]
    assert {m.data.decode(): m.delivery_attempt for m in got} == {"b0": 3, "b1": 1, "c0": 1, "c1": 1}
    broker.ack(got)

    # The lease taken before the upgrade can still be acked with its (id, token) handle.
    broker.ack([_handle_only(message_id=1, token=77)])
    assert datas(broker.pull(10, timeout=5)) == ["a1"]

    conn = sqlite3.connect(tmp_path / "broker.sqlite")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    finally:
        conn.close()


def _handle_only(*, message_id: int, token: int) -> ReceivedMessage:
    return ReceivedMessage(
        message_id=str(message_id), data=b"", attributes={}, ordering_key="a", delivery_attempt=1, handle=(message_id, token)
    )


def test_a_migrated_file_opens_again_unchanged(tmp_path):
    _write_v1_file(tmp_path / "broker.sqlite", [("a0", "a", 0, 1, None)])
    for _ in range(2):
        broker = _open_broker(tmp_path)
        try:
            assert broker.backlog().messages == 1
        finally:
            broker.close()
    broker = _open_broker(tmp_path)
    try:
        [m] = broker.pull(1, timeout=5)
        assert m.delivery_attempt == 2
    finally:
        broker.close()


def _open_broker(tmp_path: Path) -> LocalBroker:
    return LocalBroker(Settings(data_dir=tmp_path, ack_deadline_seconds=30.0))


def test_leasing_nacking_and_redelivery_never_rewrite_a_message_row(make_broker):
    broker = make_broker(ack_deadline_seconds=0.2)
    publish(broker, *[msg(f"m{i}", f"k{i % 3}") for i in range(9)])
    conn = sqlite3.connect(broker.path)
    try:
        conn.executescript(
            "CREATE TABLE message_updates (id INTEGER);"
            "CREATE TRIGGER count_message_updates AFTER UPDATE ON messages"
            " BEGIN INSERT INTO message_updates VALUES (new.id); END;"
        )
    finally:
        conn.close()

    first = broker.pull(9, timeout=5)
    broker.nack(first[:3])
    acked: set[str] = set()  # the nacked ones, then the rest after their leases expire
    for _ in range(20):
        again = broker.pull(9, timeout=5)
        broker.ack(again)
        acked.update(datas(again))
        if len(acked) == 9:
            break
    assert acked == set(datas(first))

    assert count_rows(broker.path) == 0
    conn = sqlite3.connect(broker.path)
    try:
        assert conn.execute("SELECT count(*) FROM message_updates").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    finally:
        conn.close()


def _statements_during(broker: LocalBroker, action) -> tuple[object, list[str]]:
    """Run `action`; its result and the data statements the lease connection executed.

    Trigger bodies (keeping `key_heads`) run per row inside a statement and are traced
    with its text again: a repeat of the statement just before is not another one (a
    statement run per key would show other bound values).
    """
    statements: list[str] = []
    conn = broker.leases._conn()
    conn.set_trace_callback(statements.append)
    try:
        result = action()
    finally:
        conn.set_trace_callback(None)
    distinct = [s for i, s in enumerate(statements) if i == 0 or s != statements[i - 1]]
    return result, [s for s in distinct if not s.startswith(("PRAGMA", "BEGIN", "COMMIT"))]


def test_a_pull_and_its_ack_over_many_keys_take_a_few_statements_not_one_per_key(broker):
    keys = 300
    publish(broker, *[msg(f"m{i}", f"k{i % keys}") for i in range(2 * keys)])

    got, pull_statements = _statements_during(broker, lambda: broker.pull(2 * keys, timeout=5))
    assert sorted(datas(got)) == sorted(f"m{i}" for i in range(2 * keys))
    # keys when idle; keys and runs for a few keys, then for the rest; lease; bodies
    assert len(pull_statements) <= 7, pull_statements

    _, ack_statements = _statements_during(broker, lambda: broker.ack(got))
    assert len(ack_statements) <= 2, ack_statements
    assert count_rows(broker.path) == 0


def _key_heads(path: Path) -> tuple[list[tuple], list[tuple]]:
    """The key_heads rows, and what they should be recomputed from messages and leases."""
    conn = sqlite3.connect(path)
    try:
        kept = conn.execute("SELECT ordering_key, head_id, blocked_until FROM key_heads ORDER BY 1").fetchall()
        expected = conn.execute(
            "SELECT ordering_key, min(id),"
            " coalesce((SELECT max(not_before) FROM leases AS l WHERE l.ordering_key = m.ordering_key), 0)"
            " FROM messages AS m GROUP BY ordering_key ORDER BY 1"
        ).fetchall()
    finally:
        conn.close()
    return kept, expected


def test_key_heads_follow_publish_lease_nack_ack_and_expiry(make_broker):
    broker = make_broker(ack_deadline_seconds=0.2)
    publish(broker, *[msg(f"m{i}", f"k{i % 4}") for i in range(12)])
    first = broker.pull(5, timeout=5)  # k0's run m0 m4 m8, then m1 m5 of k1
    kept, expected = _key_heads(broker.path)
    assert kept == expected and len(kept) == 4

    broker.nack(first[:1], delay_seconds=60)
    broker.ack(first[3:])
    kept, expected = _key_heads(broker.path)
    assert kept == expected
    assert [key for key, _, blocked in kept if blocked > time.time()] == ["k0"]

    time.sleep(0.3)  # the leases of k0's tail expire; its nacked head still waits
    again = broker.pull(12, timeout=5)
    assert datas(again) == ["m2", "m6", "m10", "m3", "m7", "m11", "m9"]  # oldest heads first: k2, k3, k1
    broker.ack(again)
    kept, expected = _key_heads(broker.path)
    assert kept == expected and [key for key, _, _ in kept] == ["k0"]


def test_a_version_2_file_gets_its_key_heads_on_open_keeping_leases(tmp_path, make_broker):
    old = make_broker()
    publish(old, msg("a0", "a"), msg("b0", "b"), msg("a1", "a"))
    leased = old.pull(1, timeout=5)
    assert datas(leased) == ["a0"]
    conn = sqlite3.connect(tmp_path / "broker.sqlite")
    try:  # back to version 2: no key_heads, no triggers
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
        for name in names:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("DROP TABLE key_heads")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    finally:
        conn.close()

    broker = make_broker()
    assert datas(broker.pull(10, timeout=5)) == ["b0"]  # a stays blocked by its lease
    kept, expected = _key_heads(tmp_path / "broker.sqlite")
    assert kept == expected and len(kept) == 2
    old.ack(leased)
    assert datas(broker.pull(10, timeout=5)) == ["a1"]


def test_a_key_whose_lease_expired_comes_before_keys_with_newer_heads(make_broker):
    broker = make_broker(ack_deadline_seconds=0.2)
    publish(broker, msg("a0", "a"))
    publish(broker, msg("b0", "b"), batch_id="b2")
    assert datas(broker.pull(1, timeout=5)) == ["a0"]
    time.sleep(0.3)
    assert datas(broker.pull(1, timeout=5)) == ["a0"]
