"""Replaying dead letters: publish them again through the broker, then mark them replayed.

A rejected activity is re-validated and published as a new batch, so it goes through
the same path as any request. An undecodable message is re-published byte for byte
(with a fresh dedup id, or the warehouse would skip it as already applied).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from app.broker import OutgoingMessage, make_broker
from app.pipeline.codec import dedup_id, encode_batch, new_batch_id
from app.pipeline.deadletter import DeadLetter, DeadLetterStore
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from app.settings import Settings

log = logging.getLogger("app.replay")


def _messages_for(entry: DeadLetter) -> list[OutgoingMessage]:
    batch_id = new_batch_id(None)
    if entry.kind == "activity":
        payload = entry.payload_json()
        activities = validate_batch({"user_activities": [payload]}, max_activities=1)
        return encode_batch(activities, batch_id)
    table = entry.table_name or "unknown"
    return [
        OutgoingMessage(
            data=entry.payload,
            ordering_key=table,
            attributes={"table": table, "count": "0", "batch_id": batch_id, "dedup_id": dedup_id(batch_id, table, 0)},
        )
    ]


def replay(
    settings: Settings, ids: list[int] | None, progress: Callable[[int, int], None] | None = None
) -> tuple[int, int]:
    """Replay the given entries (or all not yet replayed); returns (replayed, failed).

    `progress(handled, total)` is called once before the first entry and after each one.
    """
    store = DeadLetterStore(settings.dead_letter_file)
    broker = make_broker(settings)
    entries = store.get(ids) if ids else store.list(limit=1_000_000)
    done = failed = 0
    total = len(entries)

    async def _publish_all() -> None:
        nonlocal done, failed
        if progress:
            progress(0, total)
        for handled, entry in enumerate(sorted(entries, key=lambda e: e.id), start=1):
            try:
                await _replay_one(entry)
            finally:
                if progress:
                    progress(handled, total)

    async def _replay_one(entry: DeadLetter) -> None:
        nonlocal done, failed
        if entry.replayed_at is not None:
            return
        try:
            messages = _messages_for(entry)
        except (BatchInvalid, LimitExceeded, TypeError) as exc:
            log.warning("dead letter %d cannot be replayed: %s", entry.id, exc)
            failed += 1
            return
        result = await broker.publish(messages, batch_id=messages[0].attributes["batch_id"])
        store.mark_replayed([entry.id])
        done += 1
        log.info("replayed dead letter %d as batch %s", entry.id, result.batch_id)

    try:
        asyncio.run(_publish_all())
    finally:
        broker.close()
        store.close()
    return done, failed
