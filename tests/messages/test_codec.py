"""The message format between the API and the subscriber."""

from __future__ import annotations

import dataclasses

import hashlib
import random
import struct

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.broker.base import PORTABLE_LIMITS, MessageLimits, ReceivedMessage
from app.messages.codec import (
    MAGIC,
    UndecodableMessage,
    decode_message,
    dedup_id,
    encode_batch,
    encode_runs,
    encode_small_batch,
    json_body,
    new_batch_id,
    readable_body,
)
from app.schema.activity import Activity
from app.schema.columnar import ActivityRun, runs_of
from app.schema.identifiers import MAX_TABLE_NAME
from app.schema.types import TYPE_NAMES, TYPES
from tests.schema.test_properties import VALID
from tests.support.typed_values import TYPED_COLUMNS

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _limits(max_message_bytes: int) -> MessageLimits:
    """A broker's limits with a smaller body size."""
    return dataclasses.replace(PORTABLE_LIMITS, max_message_bytes=max_message_bytes)


def _received(m, attempt=1) -> ReceivedMessage:
    return ReceivedMessage("42", m.data, dict(m.attributes), m.ordering_key, attempt)


def _raw(data: bytes) -> ReceivedMessage:
    return ReceivedMessage("7", data, {"dedup_id": "b:t:0"}, "t", 1)


def _act(table, n, op="insert"):
    return Activity(op, table, ["n", "s"], ["integer", "string"], [n, "x" * 50])


def _typed_activities(table="typed") -> list[Activity]:
    names = [c[0] for c in TYPED_COLUMNS]
    types = [c[1] for c in TYPED_COLUMNS]
    return [Activity("insert", table, names, types, [c[2][row] for c in TYPED_COLUMNS]) for row in range(3)]


def _decoded(messages) -> list[Activity]:
    return [a for m in messages for a in decode_message(_received(m)).activities]


def test_one_message_per_table_keeps_each_tables_order():
    batch = [_act("a", 0), _act("b", 0), _act("a", 1), _act("b", 1), _act("a", 2)]
    messages = encode_batch(batch, "bid")
    assert [(m.ordering_key, m.attributes) for m in messages] == [
        ("a", {"table": "a", "count": "3", "batch_id": "bid", "dedup_id": "bid:a:0"}),
        ("b", {"table": "b", "count": "2", "batch_id": "bid", "dedup_id": "bid:b:0"}),
    ]
    assert all(m.data.startswith(MAGIC + struct.pack("<I", 2)) for m in messages)  # format 2 is what is written
    envelope = decode_message(_received(messages[0], attempt=3))
    assert envelope.dedup_id == "bid:a:0" and envelope.table == "a" and envelope.delivery_attempt == 3
    assert len(envelope) == 3 and envelope.runs is not None
    assert envelope.activities == [_act("a", 0), _act("a", 1), _act("a", 2)]


def test_runs_come_back_as_arrow_with_their_shape_in_order():
    batch = [_act("t", 0), _act("t", 1, "delete"), Activity("insert", "t", ["n"], ["integer"], [7]), _act("t", 2)]
    [message] = encode_batch(batch, "bid")
    runs = decode_message(_received(message)).runs
    assert [(r.operation, r.col_names, r.col_types, len(r)) for r in runs] == [
        ("insert", ["n", "s"], ["integer", "string"], 1),
        ("delete", ["n", "s"], ["integer", "string"], 1),
        ("insert", ["n"], ["integer"], 1),
        ("insert", ["n", "s"], ["integer", "string"], 1),
    ]
    sent = runs_of(batch)
    assert all(got.batch.equals(want.batch) for got, want in zip(runs, sent))
    assert runs[0].batch.schema == pa.schema([("0", pa.int64()), ("1", pa.string())])


def test_every_type_round_trips_including_nulls_and_non_finite_floats():
    batch = _typed_activities()
    [message] = encode_batch(batch, "bid")
    [run] = decode_message(_received(message)).runs
    assert [f.type for f in run.batch.schema] == [TYPES[c[1]].arrow_type for c in TYPED_COLUMNS]
    assert decode_message(_received(message)).activities == batch


@pytest.mark.parametrize("typ", TYPE_NAMES)
@PROPS
@given(data=st.data())
def test_valid_values_of_each_type_round_trip(typ, data):
    sent = data.draw(st.lists(VALID[typ], min_size=1, max_size=8))
    batch = [
        Activity("insert", "t", ["v", "k"], [typ, "integer"], [TYPES[typ].normalize(raw), i])
        for i, (raw, _) in enumerate(sent)
    ]
    batch.append(Activity("insert", "t", ["v", "k"], [typ, "integer"], [None, None]))
    assert _decoded(encode_batch(batch, new_batch_id(None))) == batch


def test_decoding_reads_the_body_in_place():
    data = encode_batch([_act("t", i) for i in range(100)], "bid")[0].data
    body = pa.py_buffer(data)
    [run] = decode_message(_raw(data)).runs
    for column in run.batch.columns:
        for buffer in column.buffers():
            if buffer is not None:
                # no copy: the column's buffers lie inside the message body, 8-byte aligned within it
                assert body.address <= buffer.address < body.address + body.size
                assert (buffer.address - body.address) % 8 == 0


def test_large_batches_are_split_below_the_limit_in_order():
    batch = (
        [_act("t", i) for i in range(60)]
        + [_act("t", i, "delete") for i in range(5)]
        + [_act("t", i) for i in range(60, 100)]
    )
    limit = 1500
    messages = encode_batch(batch, "bid", _limits(limit))
    assert len(messages) > 3
    assert all(len(m.data) <= limit for m in messages)
    assert [m.attributes["dedup_id"] for m in messages] == [f"bid:t:{i}" for i in range(len(messages))]
    assert _decoded(messages) == batch
    assert [int(m.attributes["count"]) for m in messages] == [len(decode_message(_received(m))) for m in messages]
    assert sum(int(m.attributes["count"]) for m in messages) == 100 + 5


def test_chunks_fill_up_to_the_limit():
    batch = [_act("t", i) for i in range(1000)]
    whole = len(encode_batch(batch, "bid")[0].data)
    messages = encode_batch(batch, "bid", _limits(whole // 4))
    assert 4 < len(messages) <= 6  # slices are sized from the run's bytes per row, not one row at a time


def test_an_activity_bigger_than_the_limit_travels_alone_and_nothing_is_lost():
    big = Activity("insert", "t", ["n", "s"], ["integer", "string"], [1, "y" * 5000])
    batch = [_act("t", 0), _act("t", 1), big, _act("t", 2)]
    messages = encode_batch(batch, "bid", _limits(1000))
    sizes = [(int(m.attributes["count"]), len(m.data) <= 1000) for m in messages]
    assert (1, False) in sizes and all(fits for count, fits in sizes if (count, fits) != (1, False))
    assert _decoded(messages) == batch


def test_encode_runs_groups_tables_in_first_seen_order():
    runs = runs_of([_act("b", 0), _act("a", 1)]) + runs_of([_act("b", 2)])
    messages = encode_runs(runs, "bid")
    assert [m.attributes["dedup_id"] for m in messages] == ["bid:b:0", "bid:a:0"]
    assert decode_message(_received(messages[0])).activities == [_act("b", 0), _act("b", 2)]


def test_batch_id_is_derived_from_the_idempotency_key_and_the_body():
    assert new_batch_id("key-1", "fp") == new_batch_id("key-1", "fp") != new_batch_id("key-2", "fp")
    # Same key, another body: its own batch (never dropped as the first one's duplicate).
    assert new_batch_id("key-1", "fp-a") != new_batch_id("key-1", "fp-b")
    assert new_batch_id(None) != new_batch_id(None)


def test_attributes_fit_pub_sub_limits_for_the_longest_table_name():
    table = "t" * MAX_TABLE_NAME
    batch_id = new_batch_id("k", "fp")
    messages = encode_batch([_act(table, i) for i in range(40)], batch_id, _limits(3000))
    assert len(messages) > 1
    dedup_ids = [m.attributes["dedup_id"] for m in messages]
    assert len(set(dedup_ids)) == len(messages)  # one per chunk
    for m in messages:
        assert len(m.data) <= 3000
        assert len(m.attributes) <= 100
        assert len(m.attributes) <= PORTABLE_LIMITS.max_attributes
        assert all(
            len(k.encode()) <= PORTABLE_LIMITS.max_attribute_key_bytes
            and len(v.encode()) <= PORTABLE_LIMITS.max_attribute_value_bytes
            for k, v in m.attributes.items()
        )
        assert len(m.ordering_key.encode()) <= PORTABLE_LIMITS.max_ordering_key_bytes
    # Hashed ids are stable: a retry of the same request produces the same ones.
    again = encode_batch([_act(table, i) for i in range(40)], batch_id, _limits(3000))
    assert [m.attributes["dedup_id"] for m in again] == dedup_ids
    assert [m.data for m in again] == [m.data for m in messages]
    assert (
        dedup_ids[0]
        == dedup_id(batch_id, table, 0)
        == "sha256:" + hashlib.sha256(f"{batch_id}:{table}:0".encode()).hexdigest()
    )


def test_readable_dedup_ids_are_kept_up_to_the_limit():
    batch_id = "b" * 32
    fits = "t" * (PORTABLE_LIMITS.max_attribute_value_bytes - len(batch_id) - len("::0"))
    assert dedup_id(batch_id, fits, 0) == f"{batch_id}:{fits}:0"
    assert dedup_id(batch_id, fits + "x", 0).startswith("sha256:")


def test_the_dedup_id_keeps_to_the_attribute_limit_it_is_given():
    small = dataclasses.replace(PORTABLE_LIMITS, max_attribute_value_bytes=64)
    [portable] = encode_batch([_act("t" * 40, 0)], "b" * 32)
    [hashed] = encode_batch([_act("t" * 40, 0)], "b" * 32, small)
    assert portable.attributes["dedup_id"] == f"{'b' * 32}:{'t' * 40}:0"
    assert hashed.attributes["dedup_id"] == "sha256:" + hashlib.sha256(portable.attributes["dedup_id"].encode()).hexdigest()


# --- format 1 (JSON) ----------------------------------------------------------------


def test_format_1_json_bodies_still_decode():
    literal = (
        b'{"v": 1, "batch_id": "old", "table": "t", "activities": [{"operation": "insert",'
        b' "col_names": ["n", "s"], "col_types": ["integer", "string"], "col_values": [1, "x"]}]}'
    )
    envelope = decode_message(_raw(literal))
    assert envelope.runs is None and envelope.table == "t" and envelope.dedup_id == "b:t:0"
    assert envelope.activities == [Activity("insert", "t", ["n", "s"], ["integer", "string"], [1, "x"])]
    typed = _typed_activities("t")
    assert decode_message(_raw(json_body("old", "t", typed))).activities == typed


def test_readable_body_renders_a_format_2_body_as_its_json_from_the_rows():
    typed = _typed_activities("t")
    [message] = encode_batch(typed, "bid")
    readable = readable_body(message.data)
    assert readable == json_body("bid", "t", typed)
    assert orjson.loads(readable)["activities"][1]["col_values"][3] == "NaN"
    assert decode_message(_raw(readable)).activities == typed  # and replayable as it is
    assert readable_body(readable) == readable
    assert readable_body(b"\x00garbage") == b"\x00garbage"
    assert readable_body(message.data[:-8]) == message.data[:-8]


# --- malformed bodies ---------------------------------------------------------------


def _body(header: object, payloads: list[bytes] = (), version: int = 2, pad: bool = True) -> bytes:
    head = orjson.dumps(header)
    if pad:
        head += b" " * (-(12 + len(head)) % 8)
    return struct.pack("<4sII", MAGIC, version, len(head)) + head + b"".join(payloads)


_ONE = pa.RecordBatch.from_arrays([pa.array([1, 2], pa.int64())], names=["0"]).serialize().to_pybytes()


def _run(**changes) -> dict:
    return {
        "operation": "insert",
        "col_names": ["n"],
        "col_types": ["integer"],
        "rows": 2,
        "bytes": len(_ONE),
    } | changes


def _header(*runs, **changes) -> dict:
    return {"batch_id": "b", "table": "t", "runs": list(runs)} | changes


def test_a_hand_made_body_decodes():
    assert decode_message(_raw(_body(_header(_run()), [_ONE]))).activities == [
        Activity("insert", "t", ["n"], ["integer"], [1]),
        Activity("insert", "t", ["n"], ["integer"], [2]),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00garbage",
        b"[]",
        orjson.dumps({"v": 3, "table": "t", "activities": []}),
        orjson.dumps({"v": 1, "table": "t"}),
        MAGIC,
        MAGIC + b"\x02\x00\x00\x00",
        _body(_header(_run()), [_ONE], version=3),
        _body(_header(_run()), [_ONE])[:13] + b"\x00" * 7,  # header cut short
        struct.pack("<4sII", MAGIC, 2, 1 << 30) + b"{}",  # header length past the end
        _body([1, 2], []),
        _body("text", []),
        _body(_header(_run(), table=5), [_ONE]),
        _body(_header(_run(), batch_id=None), [_ONE]),
        _body(_header(runs={}), []),
        _body(_header(["insert"]), [_ONE]),
        _body(_header(_run(operation="upsert")), [_ONE]),
        _body(_header(_run(col_types=["integer", "string"])), [_ONE]),
        _body(_header(_run(col_names=[], col_types=[])), [_ONE]),
        _body(_header(_run(col_names=[1])), [_ONE]),
        _body(_header(_run(col_names="n")), [_ONE]),
        _body(_header(_run(col_types=["varchar"])), [_ONE]),
        _body(_header(_run(col_types=[["integer"]])), [_ONE]),
        _body(_header(_run(col_types=["string"])), [_ONE]),  # the batch is not of that type
        _body(_header(_run(rows=3)), [_ONE]),
        _body(_header(_run(rows=True)), [_ONE]),
        _body(_header(_run(bytes=-8)), [_ONE]),
        _body(_header(_run(bytes=len(_ONE) + 8)), [_ONE]),
        _body(_header(_run(bytes=len(_ONE) - 8)), [_ONE]),
        _body(_header(_run(bytes=0)), [_ONE]),
        _body(_header(_run()), [_ONE, b"\x00" * 8]),  # bytes after the last run
        _body(_header(_run()), [b"\xff" * len(_ONE)]),
        _body(_header(_run()), [_ONE[: len(_ONE) // 2] + b"\x00" * (len(_ONE) - len(_ONE) // 2)]),
    ],
)
def test_anything_else_is_undecodable(data):
    with pytest.raises(UndecodableMessage):
        decode_message(_raw(data))


def test_string_offsets_out_of_range_are_undecodable():
    good = pa.RecordBatch.from_arrays([pa.array(["ab", "cd"])], names=["0"]).serialize().to_pybytes()
    # The offsets buffer (0, 2, 4) follows the metadata; point the last offset past the data.
    bad = good.replace(struct.pack("<iii", 0, 2, 4), struct.pack("<iii", 0, 2, 400), 1)
    assert bad != good
    run = _run(col_types=["string"], bytes=len(bad))
    assert len(decode_message(_raw(_body(_header(run), [good])))) == 2
    with pytest.raises(UndecodableMessage):
        decode_message(_raw(_body(_header(run), [bad])))


def test_a_truncated_body_is_always_undecodable():
    data = encode_batch(_typed_activities() + [_act("typed", 1, "delete")], "bid")[0].data
    for end in range(len(data)):
        with pytest.raises(UndecodableMessage):
            decode_message(_raw(data[:end]))


def test_corrupted_bytes_never_raise_anything_but_undecodable():
    data = encode_batch(_typed_activities() + [_act("typed", 1, "delete")], "bid")[0].data
    rnd = random.Random(11)
    undecodable = 0
    for _ in range(1500):
        corrupted = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            corrupted[rnd.randrange(len(data))] = rnd.randrange(256)
        try:
            decode_message(_raw(bytes(corrupted)))
        except UndecodableMessage:
            undecodable += 1
    assert undecodable > 100  # the fuzz reaches the checks, not only the values


def test_a_run_of_other_arrow_types_is_published_as_the_type_table_says():
    narrow = pa.RecordBatch.from_arrays(
        [pa.array([1, 2], pa.int32()), pa.array(["a", "b"], pa.large_string())], names=["a", "b"]
    )
    run = ActivityRun("t", "insert", ["n", "s"], ["integer", "string"], narrow)
    [message] = encode_runs([run], "bid")
    [decoded] = decode_message(_received(message)).runs
    assert decoded.batch.schema == pa.schema([("0", pa.int64()), ("1", pa.string())])
    assert decoded.activities() == [
        Activity("insert", "t", ["n", "s"], ["integer", "string"], [1, "a"]),
        Activity("insert", "t", ["n", "s"], ["integer", "string"], [2, "b"]),
    ]
    with pytest.raises(pa.ArrowInvalid):  # a lossy cast is refused: nothing is published
        encode_runs(
            [ActivityRun("t", "insert", ["n"], ["integer"], pa.record_batch([pa.array([1.5])], names=["0"]))], "bid"
        )
    with pytest.raises(ValueError, match="2 columns for 1 col_types"):
        encode_runs([ActivityRun("t", "insert", ["n"], ["integer"], narrow)], "bid")


def test_a_small_batch_is_json_per_table_and_decodes_to_the_same_activities():
    acts = [_act("a", 1), _act("b", 2), _act("a", 3, op="delete")]
    messages = encode_small_batch(acts, "b1")
    assert [m.ordering_key for m in messages] == ["a", "b"]
    assert all(orjson.loads(m.data)["v"] == 1 for m in messages)
    assert [m.attributes["dedup_id"] for m in messages] == ["b1:a:0", "b1:b:0"]
    assert [m.attributes["count"] for m in messages] == ["2", "1"]
    assert sorted(_decoded(messages), key=lambda a: a.table) == sorted(acts, key=lambda a: a.table)


def test_a_small_batch_over_the_size_limit_is_chunked_as_arrow():
    acts = [_act("a", n) for n in range(6)]
    messages = encode_small_batch(acts, "b1", _limits(300))
    assert len(messages) > 1 and all(m.data.startswith(MAGIC) for m in messages)
    assert _decoded(messages) == acts


def _upserts(table: str) -> list[Activity]:
    return [
        Activity("upsert", table, ["id", "v"], ["integer", "string"], [i, f"v{i}"], ["id"]) for i in range(3)
    ] + [Activity("insert", table, ["id", "v"], ["integer", "string"], [9, "x"])]


def test_an_upsert_keeps_its_key_in_both_formats():
    for encode in (encode_batch, encode_small_batch):
        [message] = encode(_upserts("t"), "bid")
        envelope = decode_message(_received(message))
        assert envelope.activities == _upserts("t")
        assert orjson.loads(readable_body(message.data))["activities"][0]["key"] == ["id"]
    runs = decode_message(_received(encode_batch(_upserts("t"), "bid")[0])).runs
    assert [(r.operation, r.key) for r in runs] == [("upsert", ["id"]), ("insert", None)]


def test_a_format_2_body_written_before_upserts_existed_decodes():
    """A header entry without "key" (what the broker may still hold): a run of no key."""
    [message] = encode_batch([_act("t", 0), _act("t", 1)], "bid")
    assert b'"key"' not in message.data
    assert all(a.key is None for a in decode_message(_received(message)).activities)


@pytest.mark.parametrize("key", [None, [], ["nope"], "id", [1]])
def test_an_upsert_without_a_proper_key_is_undecodable(key):
    body = json_body("b", "t", [Activity("upsert", "t", ["id"], ["integer"], [1], ["id"])])
    item = orjson.loads(body)
    if key is None:
        del item["activities"][0]["key"]
    else:
        item["activities"][0]["key"] = key
    with pytest.raises(UndecodableMessage):
        decode_message(_raw(orjson.dumps(item)))


def test_a_key_on_an_insert_is_undecodable():
    item = orjson.loads(json_body("b", "t", [_act("t", 0)]))
    item["activities"][0]["key"] = ["a"]
    with pytest.raises(UndecodableMessage):
        decode_message(_raw(orjson.dumps(item)))
