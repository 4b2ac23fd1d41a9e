"""Keeping per-table order on Pub/Sub, on both sides.

Publisher: a failed ordered publish pauses its ordering key in the client library, and
every later publish with that key fails until the key is resumed
(https://cloud.google.com/pubsub/docs/publisher#using-ordering-keys). `PausedKeys`
resumes the keys of failed messages so `publish()` can re-publish them in order.

Subscriber: `KeyGate` holds what was pulled but not yet handed to the pipeline, per
ordering key in arrival order, and hands a key's messages out only while the pipeline
holds none of that key. Pub/Sub delivers a key's messages in order, and on a stream it
sends later messages of a key to the subscriber that has earlier ones outstanding (key
affinity, https://cloud.google.com/pubsub/docs/ordering), which may be several at once:
the gate applies them one run at a time, in order, also when Pub/Sub redelivers a message
we still hold (its lease ended) and on emulators that do not enforce ordering. Not
thread-safe: the caller holds a lock.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from app.broker.base import ReceivedMessage

log = logging.getLogger(__name__)


class PausedKeys:
    """Resume the ordering keys that a failed publish paused in the publisher client."""

    def __init__(self, topic_path: str, enabled: bool) -> None:
        self.topic_path = topic_path
        self.enabled = enabled

    def resume(self, publisher: Any, keys: Iterable[str]) -> None:
        if not self.enabled or publisher is None:
            return
        for key in {k for k in keys if k}:
            try:
                publisher.resume_publish(self.topic_path, key)
            except Exception:  # stopped publisher / unseen key
                log.debug("resume_publish(%s) failed", key, exc_info=True)


@dataclass(eq=False, slots=True)
class Lease:
    """One pulled message while this process holds it: its current ack id and lease start."""

    ack_id: str
    message: ReceivedMessage
    received_at: float  # time.monotonic() of the delivery
    extending: bool = True  # False once past the max lease: left to expire
    nbytes: int = field(default=0)


class KeyGate:
    """Pulled messages waiting per ordering key, and the keys the pipeline is working on."""

    def __init__(self) -> None:
        self._waiting: dict[str, collections.deque[Lease]] = {}  # insertion order = arrival order
        self._busy: collections.Counter[str] = collections.Counter()
        self.waiting_count = 0
        self.waiting_bytes = 0

    # --- arrivals ---
    def add(self, lease: Lease) -> bool:
        """Queue a delivery; False if it was a redelivery of a message still waiting, whose
        ack id (the old one is stale) and lease start are then replaced instead."""
        queue = self._waiting.setdefault(lease.message.ordering_key, collections.deque())
        for waiting in queue:
            if waiting.message.message_id == lease.message.message_id:
                waiting.ack_id, waiting.received_at, waiting.extending = lease.ack_id, lease.received_at, True
                waiting.message.delivery_attempt = lease.message.delivery_attempt
                waiting.message.received_at, waiting.message.lease_lost = lease.received_at, False
                return False
        queue.append(lease)
        self.waiting_count += 1
        self.waiting_bytes += lease.nbytes
        return True

    # --- hand-out ---
    def take(self, max_messages: int, max_bytes: int) -> list[Lease]:
        """Up to `max_messages` (and `max_bytes`, but at least one) waiting messages of free
        keys, oldest key first, each key's run in order; their keys become busy until
        `release`d. Messages without an ordering key are never held back."""
        out: list[Lease] = []
        size = 0
        for key in list(self._waiting):
            if key and self._busy[key]:
                continue
            queue = self._waiting[key]
            while queue and len(out) < max_messages and (not out or size + queue[0].nbytes <= max_bytes):
                lease = queue.popleft()
                self._forget(lease)
                out.append(lease)
                size += lease.nbytes
                if key:
                    self._busy[key] += 1
            if not queue:
                del self._waiting[key]
            if len(out) >= max_messages or (queue and out):
                break  # full, or the byte bound stopped this key's run
        return out

    def release(self, lease: Lease) -> None:
        key = lease.message.ordering_key
        if key and self._busy[key]:
            self._busy[key] -= 1
            if not self._busy[key]:
                del self._busy[key]

    def has_ready(self) -> bool:
        return any(not key or not self._busy[key] for key in self._waiting)

    # --- removal ---
    def pop_copies(self, message_id: str, key: str) -> list[Lease]:
        """Waiting redeliveries of a message the pipeline just finished."""
        queue = self._waiting.get(key)
        if not queue:
            return []
        copies = [w for w in queue if w.message.message_id == message_id]
        for lease in copies:
            queue.remove(lease)
            self._forget(lease)
        if not queue:
            del self._waiting[key]
        return copies

    def pop_key(self, key: str) -> list[Lease]:
        """Everything waiting for `key`: after a nack Pub/Sub redelivers the nacked message
        and all later ones of its key, so these must not go out before it."""
        queue = self._waiting.pop(key, None) or ()
        for lease in queue:
            self._forget(lease)
        return list(queue)

    def pop_all(self) -> list[Lease]:
        leases = [lease for queue in self._waiting.values() for lease in queue]
        self._waiting.clear()
        self.waiting_count = self.waiting_bytes = 0
        return leases

    def waiting(self) -> list[Lease]:
        return [lease for queue in self._waiting.values() for lease in queue]

    def drop(self, lease: Lease) -> None:
        """Stop holding a waiting message (its lease ran out; Pub/Sub redelivers it)."""
        key = lease.message.ordering_key
        queue = self._waiting.get(key)
        if queue is not None and lease in queue:
            queue.remove(lease)
            self._forget(lease)
            if not queue:
                del self._waiting[key]

    def _forget(self, lease: Lease) -> None:
        self.waiting_count -= 1
        self.waiting_bytes -= lease.nbytes
