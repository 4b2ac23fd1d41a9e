"""The message format between the API and the subscriber."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from app.broker.base import ReceivedMessage
from app.pipeline.codec import UndecodableMessage, decode_message, dedup_id, encode_batch, new_batch_id
from app.schema.activity import Activity
from app.schema.identifiers import MAX_TABLE_NAME


def _received(m, attempt=1) -> ReceivedMessage:
    return ReceivedMessage("42", m.data, dict(m.attributes), m.ordering_key, attempt)


def _act(table, n):
    return Activity("insert", table, ["n", "s"], ["integer", "string"], [n, "x" * 50])


def test_one_message_per_table_keeps_each_tables_order():
    batch = [_act("a", 0), _act("b", 0), _act("a", 1), _act("b", 1), _act("a", 2)]
    messages = encode_batch(batch, "bid")
    assert [(m.ordering_key, m.attributes) for m in messages] == [
        ("a", {"table": "a", "count": "3", "batch_id": "bid", "dedup_id": "bid:a:0"}),
        ("b", {"table": "b", "count": "2", "batch_id": "bid", "dedup_id": "bid:b:0"}),
    ]
    envelope = decode_message(_received(messages[0], attempt=3))
    assert envelope.dedup_id == "bid:a:0" and envelope.table == "a" and envelope.delivery_attempt == 3
    assert envelope.activities == [_act("a", 0), _act("a", 1), _act("a", 2)]


def test_large_batches_are_split_below_the_limit_in_order():
    batch = [_act("t", i) for i in range(100)]
    limit = 1500
    messages = encode_batch(batch, "bid", max_message_bytes=limit)
    assert len(messages) > 1
    assert all(len(m.data) <= limit + 200 for m in messages)  # the limit counts activities; the envelope adds a little
    assert [m.attributes["dedup_id"] for m in messages] == [f"bid:t:{i}" for i in range(len(messages))]
    decoded = [a for m in messages for a in decode_message(_received(m)).activities]
    assert decoded == batch
    assert sum(int(m.attributes["count"]) for m in messages) == 100


def test_batch_id_is_derived_from_the_idempotency_key_and_the_body():
    assert new_batch_id("key-1", "fp") == new_batch_id("key-1", "fp") != new_batch_id("key-2", "fp")
    # Same key, another body: its own batch (never dropped as the first one's duplicate).
    assert new_batch_id("key-1", "fp-a") != new_batch_id("key-1", "fp-b")
    assert new_batch_id(None) != new_batch_id(None)


def test_attributes_fit_pub_sub_limits_for_the_longest_table_name():
    table = "t" * MAX_TABLE_NAME
    batch_id = new_batch_id("k", "fp")
    messages = encode_batch([_act(table, i) for i in range(40)], batch_id, max_message_bytes=1500)
    assert len(messages) > 1
    dedup_ids = [m.attributes["dedup_id"] for m in messages]
    assert len(set(dedup_ids)) == len(messages)  # one per chunk
    for m in messages:
        assert len(m.attributes) <= 100
        assert all(len(k.encode()) <= 256 and len(v.encode()) <= 1024 for k, v in m.attributes.items())
        assert len(m.ordering_key.encode()) <= 1024
    # Hashed ids are stable: a retry of the same request produces the same ones.
    again = encode_batch([_act(table, i) for i in range(40)], batch_id, max_message_bytes=1500)
    assert [m.attributes["dedup_id"] for m in again] == dedup_ids
    assert dedup_ids[0] == dedup_id(batch_id, table, 0) == "sha256:" + hashlib.sha256(f"{batch_id}:{table}:0".encode()).hexdigest()


def test_readable_dedup_ids_are_kept_up_to_the_limit():
    batch_id = "b" * 32
    fits = "t" * (1024 - len(batch_id) - len("::0"))
    assert dedup_id(batch_id, fits, 0) == f"{batch_id}:{fits}:0"
    assert dedup_id(batch_id, fits + "x", 0).startswith("sha256:")


@pytest.mark.parametrize(
    "data",
    [b"\x00garbage", b"[]", orjson.dumps({"v": 2, "table": "t", "activities": []}), orjson.dumps({"v": 1, "table": "t"})],
)
def test_anything_else_is_undecodable(data):
    with pytest.raises(UndecodableMessage):
        decode_message(ReceivedMessage("7", data, {}, "t", 1))
