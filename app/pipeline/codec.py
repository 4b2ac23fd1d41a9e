"""Message format between the API and the subscriber.

One message per (request, table) chunk, so a table's activities stay in order under its
ordering key and no message passes the broker's size limit. The body is JSON:

    {"v": 1, "batch_id": "...", "table": "t", "activities": [
        {"operation": "insert", "col_names": [...], "col_types": [...], "col_values": [...]}]}

Attributes: `table`, `count`, `batch_id` and `dedup_id` (`<batch_id>:<table>:<chunk>`),
which the warehouse records so a redelivered or re-published chunk applies once.

Pub/Sub limits (https://cloud.google.com/pubsub/quotas#resource_limits): a message of at
most 10 MB including attributes, at most 100 attributes, keys of at most 256 bytes,
values and the ordering key of at most 1,024 bytes. Table names are ASCII of at most
1,024 characters (app.schema.identifiers), so `table` and the ordering key fit; a
`dedup_id` that would not fit is replaced by a stable `sha256:<hex>` of itself.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import orjson

from app.broker.base import OutgoingMessage, ReceivedMessage
from app.schema.activity import Activity
from app.schema.columnar import ActivityRun
from app.warehouse.base import Envelope

FORMAT_VERSION = 1
# Pub/Sub refuses messages over 10 MB; stay well below it including attributes.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
ATTRIBUTE_VALUE_MAX_BYTES = 1024
HASHED_ID_PREFIX = "sha256:"


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
        return os.urandom(16).hex()  # 128 random bits, as uuid4().hex but cheaper on the hot path
    seed = f"{idempotency_key}\n{request_fingerprint or ''}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def dedup_id(batch_id: str, table: str, chunk_index: int) -> str:
    """`<batch_id>:<table>:<chunk>`, or a stable hash of it when that would not fit in a
    Pub/Sub attribute value (long table names)."""
    readable = f"{batch_id}:{table}:{chunk_index}"
    if len(readable.encode()) <= ATTRIBUTE_VALUE_MAX_BYTES:
        return readable
    return HASHED_ID_PREFIX + hashlib.sha256(readable.encode()).hexdigest()


def _activity_body(a: Activity) -> dict:
    return {"operation": a.operation, "col_names": a.col_names, "col_types": a.col_types, "col_values": a.col_values}


def encode_batch(
    activities: Sequence[Activity], batch_id: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[OutgoingMessage]:
    """Split a validated batch into per-table messages, keeping each table's order."""
    by_table: dict[str, list[dict]] = {}
    for a in activities:
        by_table.setdefault(a.table, []).append(_activity_body(a))
    messages: list[OutgoingMessage] = []
    for table, bodies in by_table.items():
        for chunk_index, data, count in _encoded_chunks(batch_id, table, bodies, max_message_bytes):
            messages.append(
                OutgoingMessage(
                    data=data,
                    ordering_key=table,
                    attributes={
                        "table": table,
                        "count": str(count),
                        "batch_id": batch_id,
                        "dedup_id": dedup_id(batch_id, table, chunk_index),
                    },
                )
            )
    return messages


def encode_runs(
    runs: Sequence[ActivityRun], batch_id: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[OutgoingMessage]:
    """Split validated runs (`app.schema.columnar.runs_of`) into per-table messages."""
    return encode_batch([a for run in runs for a in run.activities()], batch_id, max_message_bytes)


def _encode(batch_id: str, table: str, bodies: list[dict]) -> bytes:
    return orjson.dumps({"v": FORMAT_VERSION, "batch_id": batch_id, "table": table, "activities": bodies})


def _encoded_chunks(batch_id: str, table: str, bodies: list[dict], max_bytes: int) -> Iterable[tuple[int, bytes, int]]:
    """(chunk index, message body, activity count); the common case is one chunk, encoded once."""
    whole = _encode(batch_id, table, bodies)
    if len(whole) <= max_bytes:
        yield 0, whole, len(bodies)
        return
    chunk: list[dict] = []
    size = 0
    index = 0
    for body in bodies:
        body_size = len(orjson.dumps(body)) + 1
        if chunk and size + body_size > max_bytes:
            yield index, _encode(batch_id, table, chunk), len(chunk)
            index += 1
            chunk, size = [], 0
        chunk.append(body)
        size += body_size
    if chunk:
        yield index, _encode(batch_id, table, chunk), len(chunk)


def decode_message(message: ReceivedMessage) -> Envelope:
    """Turn a delivered message back into an Envelope; raise UndecodableMessage if it is not one."""
    try:
        body = orjson.loads(message.data)
        if not isinstance(body, dict) or body.get("v") != FORMAT_VERSION:
            raise ValueError(f"unknown message format version {body.get('v') if isinstance(body, dict) else None!r}")
        table = body["table"]
        # The subscriber's hot loop: positional construction, and the lists orjson just
        # made are used as they are (anything else is still turned into a list).
        activities = [
            Activity(
                item["operation"],
                table,
                names if (names := item["col_names"]).__class__ is list else list(names),
                types if (types := item["col_types"]).__class__ is list else list(types),
                values if (values := item["col_values"]).__class__ is list else list(values),
            )
            for item in body["activities"]
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UndecodableMessage(f"undecodable message {message.message_id}: {exc}") from exc
    return Envelope(
        dedup_id=message.dedup_id, table=table, activities=activities, delivery_attempt=message.delivery_attempt
    )
