"""Message format between the API and the subscriber.

One message per (request, table) chunk, so a table's activities stay in order under its
ordering key and no message passes the broker's size limit. Attributes: `table`,
`count`, `batch_id` and `dedup_id` (`<batch_id>:<table>:<chunk>`), which the warehouse
records so a redelivered or re-published chunk applies once.

Format 2 (written): the chunk's runs (`app.schema.columnar.ActivityRun`) as Arrow IPC
record batches, so values stay columnar from the API to the warehouse. All integers are
unsigned little-endian:

    offset 0   b"ACTV"                      magic (a v1 body starts with "{")
    offset 4   uint32 format version        2
    offset 8   uint32 header length H       the header's trailing spaces included
    offset 12  H bytes of JSON, padded with spaces so that 12 + H is a multiple of 8:
               {"batch_id": "...", "table": "t", "runs": [{"operation": "insert",
                "col_names": [...], "col_types": [...], "rows": n, "bytes": m}, ...]}
               an upsert run's entry also has "key": [...] (its key columns); an
               entry without it is a run of no key, so bodies written before upserts
               existed decode unchanged
    then, per run in order, its record batch as one Arrow IPC encapsulated message
    (https://arrow.apache.org/docs/format/Columnar.html#encapsulated-message-format) of
    `bytes` bytes, a multiple of 8, so every buffer stays 8-byte aligned.

The schema is not sent: a run's fields are named by position ("0", "1", ...) and typed
by `TYPES[col_type].arrow_type`, which the header's `col_types` give. Decoding reads the
batches in place (no copy of the body) and validates them fully; any malformed body is
an `UndecodableMessage`.

Format 1 is JSON. It is what a small request is written as (`encode_small_batch`: below
`SMALL_BATCH_ACTIVITIES`, Arrow's fixed cost per array exceeds the whole JSON path), and
it is still decoded for backlogs across an upgrade and replays; it is also the readable
form of dead letters (`readable_body`):

    {"v": 1, "batch_id": "...", "table": "t", "activities": [
        {"operation": "insert", "col_names": [...], "col_types": [...], "col_values": [...]}]}

    (an upsert's object also has "key": [...])

Sizes keep to the `MessageLimits` the encoder is given: the API passes its broker's
(`broker.capabilities.message`), tools without a broker the portable ones every built-in
broker takes (`app.broker.base.PORTABLE_LIMITS`). Bodies stay within
`max_message_bytes`: a run too big is cut by rows across chunks; only a single activity
bigger than the limit (the API's value limits rule it out) travels alone in a chunk
over it. Table names are ASCII of at most 1,024 characters (app.schema.identifiers),
which is the built-in brokers' ordering-key and attribute-value limit, so `table` and
the ordering key fit; a `dedup_id` that would not fit is replaced by a stable
`sha256:<hex>` of itself.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Sequence

import orjson
import pyarrow as pa

from app.broker.base import PORTABLE_LIMITS, MessageLimits, OutgoingMessage, ReceivedMessage
from app.schema.activity import OPERATIONS, Activity
from app.schema.columnar import ActivityRun, field_name, runs_of
from app.schema.types import TYPES
from app.messages.envelope import Envelope
from app.messages.ids import timed_hex_id

FORMAT_VERSION = 2
JSON_FORMAT_VERSION = 1
MAGIC = b"ACTV"
_PREFIX = struct.Struct("<4sII")  # magic, version, header length
_ALIGNMENT = 8
HASHED_ID_PREFIX = "sha256:"

# What a malformed body can raise while it is read: orjson's errors are ValueErrors;
# Arrow's derive from ArrowException, but for its IO errors (a bad IPC message) and the
# EOFError of an empty one.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    EOFError,
    pa.ArrowException,
    pa.ArrowIOError,
)


class UndecodableMessage(Exception):
    """The message body is not a valid chunk: it can never apply (dead-letter it)."""


def new_batch_id(idempotency_key: str | None, request_fingerprint: str | None = None) -> str:
    """Random for plain requests; derived from the key AND the body's fingerprint otherwise.

    A retry (same key, same body) re-publishes the same dedup ids, which the warehouse
    drops. The same key with another body gets its own batch id: on Pub/Sub, which keeps
    no record of keys, it would otherwise be accepted and then dropped as a duplicate.
    (The local broker answers that case with 409 before anything is published.)
    """
    if idempotency_key is None:
        return timed_hex_id()  # its time, then 76 random bits, without a system call per id
    seed = f"{idempotency_key}\n{request_fingerprint or ''}"
    digest = hashlib.sha256(seed.encode()).hexdigest()
    # Never a timed id's 13th digit: a digest is not a time (its receipt is looked for without one).
    return digest[:12] + ("8" if digest[12] == "7" else digest[12]) + digest[13:32]


def dedup_id(batch_id: str, table: str, chunk_index: int, limits: MessageLimits = PORTABLE_LIMITS) -> str:
    """`<batch_id>:<table>:<chunk>`, or a stable hash of it when that would not fit in an
    attribute value (long table names)."""
    readable = f"{batch_id}:{table}:{chunk_index}"
    if len(readable.encode()) <= limits.max_attribute_value_bytes:
        return readable
    return HASHED_ID_PREFIX + hashlib.sha256(readable.encode()).hexdigest()


# --- encoding -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _schema(col_types: tuple[str, ...]) -> pa.Schema:
    """A run's schema: fields named by position, typed by the type table."""
    return pa.schema([pa.field(field_name(i), TYPES[t].arrow_type) for i, t in enumerate(col_types)])


def encode_batch(
    activities: Sequence[Activity], batch_id: str, limits: MessageLimits = PORTABLE_LIMITS
) -> list[OutgoingMessage]:
    """Split a validated batch into per-table messages, keeping each table's order."""
    return encode_runs(runs_of(activities), batch_id, limits)


# Requests of at most this many activities are validated per value and written as format
# 1: measured in-process, the README body costs ~20-30 us that way against ~60-120 us
# through Arrow (validate_runs + format 2), and the two cross between 8 and 16 activities.
SMALL_BATCH_ACTIVITIES = 8


def encode_small_batch(
    activities: Sequence[Activity], batch_id: str, limits: MessageLimits = PORTABLE_LIMITS
) -> list[OutgoingMessage]:
    """A small validated batch as format 1 messages, one per table (format 2 when a
    table's body would pass the size limit, which chunks it)."""
    by_table: dict[str, list[Activity]] = {}
    for a in activities:
        by_table.setdefault(a.table, []).append(a)
    messages: list[OutgoingMessage] = []
    for table, table_activities in by_table.items():
        data = json_body(batch_id, table, table_activities)
        if len(data) > limits.max_message_bytes:
            return encode_batch(activities, batch_id, limits)
        messages.append(_message(data, table, len(table_activities), batch_id, 0, limits))
    return messages


def _message(
    data: bytes, table: str, count: int, batch_id: str, chunk_index: int, limits: MessageLimits
) -> OutgoingMessage:
    return OutgoingMessage(
        data=data,
        ordering_key=table,
        attributes={
            "table": table,
            "count": str(count),
            "batch_id": batch_id,
            "dedup_id": dedup_id(batch_id, table, chunk_index, limits),
        },
    )


def encode_runs(
    runs: Sequence[ActivityRun], batch_id: str, limits: MessageLimits = PORTABLE_LIMITS
) -> list[OutgoingMessage]:
    """Split validated runs (`app.schema.columnar.runs_of`) into per-table messages.

    Tables come in first-seen order, and each table's runs keep their order."""
    by_table: dict[str, list[ActivityRun]] = {}
    for run in runs:
        by_table.setdefault(run.table, []).append(run)
    messages: list[OutgoingMessage] = []
    for table, table_runs in by_table.items():
        for chunk_index, (data, count) in enumerate(_bodies(batch_id, table, table_runs, limits.max_message_bytes)):
            messages.append(_message(data, table, count, batch_id, chunk_index, limits))
    return messages


def _bodies(batch_id: str, table: str, runs: list[ActivityRun], max_bytes: int) -> list[tuple[bytes, int]]:
    """(body, activity count) of each chunk of the table's runs, in order. The common
    case, one chunk, serializes each run once and assembles one body."""
    head = b'{"batch_id":' + orjson.dumps(batch_id) + b',"table":' + orjson.dumps(table) + b',"runs":['
    runs = [_conformed(run) for run in runs]
    pieces = [_Piece(run, len(run), run.batch.serialize()) for run in runs]
    body = _body(head, pieces)
    if len(body) <= max_bytes:
        return [(body, sum(p.rows for p in pieces))]
    return [(_body(head, chunk), sum(p.rows for p in chunk)) for chunk in _chunked(head, runs, pieces, max_bytes)]


def _conformed(run: ActivityRun) -> ActivityRun:
    """The run with the schema decoding expects (`_schema` of its col_types): a batch of
    other Arrow types is cast safely, so that what is published always decodes."""
    schema = _schema(tuple(run.col_types))
    batch = run.batch
    if batch.schema.equals(schema):
        return run
    if batch.num_columns != len(schema) or len(run.col_names) != len(schema):
        raise ValueError(f"a run of {run.table} has {batch.num_columns} columns for {len(schema)} col_types")
    columns = [column.cast(field.type) for column, field in zip(batch.columns, schema)]
    return ActivityRun(
        run.table,
        run.operation,
        run.col_names,
        run.col_types,
        pa.RecordBatch.from_arrays(columns, schema=schema),
        run.key,
    )


class _Piece:
    """A run, or a slice of its rows: its record batch serialized, and its header entry."""

    __slots__ = ("rows", "payload", "entry")

    def __init__(self, run: ActivityRun, rows: int, payload: pa.Buffer) -> None:
        self.rows = rows
        self.payload = payload
        entry = {
            "operation": run.operation,
            "col_names": run.col_names,
            "col_types": run.col_types,
            "rows": rows,
            "bytes": payload.size,
        }
        if run.key is not None:
            entry["key"] = run.key
        self.entry = orjson.dumps(entry)


def _body(head: bytes, pieces: Sequence[_Piece]) -> bytes:
    header = head + b",".join([p.entry for p in pieces]) + b"]}"
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGNMENT)
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *[p.payload for p in pieces]])


class _Chunk:
    """Pieces being packed into one message, with the size of the body they make."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.pieces: list[_Piece] = []
        self._entries = self._payloads = 0

    def size_with(self, piece: _Piece) -> int:
        """What `_body` would make of these pieces and `piece`, in bytes."""
        header = len(self.head) + self._entries + len(piece.entry) + len(self.pieces) + len(b"]}")
        header += -(_PREFIX.size + header) % _ALIGNMENT
        return _PREFIX.size + header + self._payloads + piece.payload.size

    def add(self, piece: _Piece) -> None:
        self.pieces.append(piece)
        self._entries += len(piece.entry)
        self._payloads += piece.payload.size


def _chunked(head: bytes, runs: list[ActivityRun], pieces: list[_Piece], max_bytes: int) -> list[list[_Piece]]:
    """The pieces packed in order into chunks of at most `max_bytes`, a run too big for
    one chunk cut by rows first."""
    chunks = [_Chunk(head)]
    for run, whole in zip(runs, pieces):
        for piece in _cut(head, run, whole, max_bytes):
            if chunks[-1].pieces and chunks[-1].size_with(piece) > max_bytes:
                chunks.append(_Chunk(head))
            chunks[-1].add(piece)
    return [chunk.pieces for chunk in chunks]


def _cut(head: bytes, run: ActivityRun, whole: _Piece, max_bytes: int) -> list[_Piece]:
    """The run whole, or cut by rows into pieces that each fit a chunk alone (but for a
    single row bigger than that: it goes alone)."""
    total = whole.rows
    if total <= 1 or _Chunk(head).size_with(whole) <= max_bytes:
        return [whole]
    bytes_per_row = whole.payload.size / total
    pieces: list[_Piece] = []
    start = 0
    while start < total:
        rows = max(1, min(total - start, int(max_bytes / bytes_per_row * 0.9)))
        while True:
            piece = _Piece(run, rows, run.batch.slice(start, rows).serialize())
            if rows == 1 or _Chunk(head).size_with(piece) <= max_bytes:
                break
            rows //= 2  # rows of uneven size: halve until it fits
        pieces.append(piece)
        start += rows
    return pieces


# --- decoding -------------------------------------------------------------------------


def decode_message(message: ReceivedMessage) -> Envelope:
    """Turn a delivered message back into an Envelope; raise UndecodableMessage if it is not one.

    A format 2 body gives an Envelope of `runs` (values stay in Arrow), a format 1 body
    one of `activities`."""
    data = message.data
    try:
        if data[:4] == MAGIC:
            _, table, runs = _decode_runs(data)
            return Envelope(message.dedup_id, table, delivery_attempt=message.delivery_attempt, runs=runs)
        table, activities = _decode_json(data)
    except _MALFORMED as exc:
        raise UndecodableMessage(f"undecodable message {message.message_id}: {exc}") from exc
    return Envelope(message.dedup_id, table, activities, message.delivery_attempt)


def _decode_runs(data: bytes) -> tuple[str, str, list[ActivityRun]]:
    """(batch id, table, runs) of a format 2 body."""
    _, version, header_size = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown message format version {version}")
    offset = _PREFIX.size + header_size
    if offset > len(data):
        raise ValueError("header runs past the end of the body")
    header = orjson.loads(memoryview(data)[_PREFIX.size : offset])
    batch_id, table = header["batch_id"], header["table"]
    if batch_id.__class__ is not str or table.__class__ is not str or header["runs"].__class__ is not list:
        raise ValueError("the header needs a batch_id, a table and runs")
    body = pa.py_buffer(data)
    runs: list[ActivityRun] = []
    for entry in header["runs"]:
        operation, names, types = entry["operation"], entry["col_names"], entry["col_types"]
        rows, size = entry["rows"], entry["bytes"]
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        if (
            names.__class__ is not list
            or types.__class__ is not list
            or not types
            or len(names) != len(types)
            or not all(n.__class__ is str for n in names)
        ):
            raise ValueError("col_names and col_types must be non-empty lists of the same length")
        if rows.__class__ is not int or size.__class__ is not int or rows < 0 or size < 0 or offset + size > len(data):
            raise ValueError("a run's rows or bytes are out of range")
        key = _key_of(operation, entry.get("key"), names)
        batch = pa.ipc.read_record_batch(body.slice(offset, size), _schema(tuple(types)))
        if batch.num_rows != rows:
            raise ValueError(f"a run holds {batch.num_rows} rows, its header says {rows}")
        batch.validate(full=True)
        runs.append(ActivityRun(table, operation, names, types, batch, key))
        offset += size
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last run")
    return batch_id, table, runs


def _key_of(operation: str, key: object, names: list) -> list[str] | None:
    """A run's or activity's key as decoded: a list of its column names for an upsert, else absent."""
    if operation != "upsert":
        if key is not None:
            raise ValueError(f"a {operation} has a key")
        return None
    if key.__class__ is not list or not key or not all(k.__class__ is str and k in names for k in key):  # type: ignore[union-attr]
        raise ValueError("an upsert needs a key: a non-empty list of its column names")
    return key  # type: ignore[return-value]


def _decode_json(data: bytes) -> tuple[str, list[Activity]]:
    body = orjson.loads(data)
    if not isinstance(body, dict) or body.get("v") != JSON_FORMAT_VERSION:
        raise ValueError(f"unknown message format version {body.get('v') if isinstance(body, dict) else None!r}")
    table = body["table"]
    # Positional construction, and the lists orjson just made are used as they are
    # (anything else is still turned into a list).
    activities = [
        Activity(
            item["operation"],
            table,
            names if (names := item["col_names"]).__class__ is list else list(names),
            types if (types := item["col_types"]).__class__ is list else list(types),
            values if (values := item["col_values"]).__class__ is list else list(values),
            _key_of(item["operation"], item.get("key"), names) if "key" in item or item["operation"] == "upsert" else None,
        )
        for item in body["activities"]
    ]
    return table, activities


# --- the readable form ----------------------------------------------------------------


def json_body(batch_id: str, table: str, activities: Sequence[Activity]) -> bytes:
    """Activities as a format 1 (JSON) body: one object per activity, canonical values."""
    return orjson.dumps(
        {
            "v": JSON_FORMAT_VERSION,
            "batch_id": batch_id,
            "table": table,
            "activities": [_json_item(a) for a in activities],
        }
    )


def _json_item(a: Activity) -> dict:
    item = {"operation": a.operation, "col_names": a.col_names, "col_types": a.col_types, "col_values": a.col_values}
    if a.key is not None:
        item["key"] = a.key
    return item


def readable_body(data: bytes) -> bytes:
    """A body as people (and `decode_message`) read it: a format 2 body rendered back
    from its rows as the equivalent format 1 JSON; anything else (JSON already, or
    undecodable) as it is."""
    if data[:4] != MAGIC:
        return bytes(data)
    try:
        batch_id, table, runs = _decode_runs(data)
        activities = [a for run in runs for a in run.activities()]
    except _MALFORMED:
        return bytes(data)
    return json_body(batch_id, table, activities)
