"""The message format between the API and the subscriber."""

from __future__ import annotations

import orjson
import pytest

from app.broker.base import ReceivedMessage
from app.pipeline.codec import UndecodableMessage, decode_message, encode_batch, new_batch_id
from app.schema.activity import Activity


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


def test_batch_id_is_derived_from_the_idempotency_key():
    assert new_batch_id("key-1") == new_batch_id("key-1") != new_batch_id("key-2")
    assert new_batch_id(None) != new_batch_id(None)


@pytest.mark.parametrize(
    "data",
    [b"\x00garbage", b"[]", orjson.dumps({"v": 2, "table": "t", "activities": []}), orjson.dumps({"v": 1, "table": "t"})],
)
def test_anything_else_is_undecodable(data):
    with pytest.raises(UndecodableMessage):
        decode_message(ReceivedMessage("7", data, {}, "t", 1))
