"""An in-memory `Broker` for tests: the whole interface, with nothing to start or clean up.

Brokers opened with the same `Settings.broker_file` share one `MemoryStream` (another
replica, or the same stream after a restart), as the local broker shares its file.
Registered as `BROKER=memory` by importing this module (tests only).

What it keeps: publish all-or-nothing, idempotency keys (duplicate / conflict), FIFO per
ordering key with leases that end after the ack deadline, ack, nack with a delay,
delivery attempts, backlog, and a dead-letter destination of its own that records what
the pipeline forwards. Two knobs for the subscriber's tests: `one_run_per_key=False`
hands out a key's later messages while earlier ones are leased (as a synchronous Pub/Sub
pull may), and `redeliver_nacked_at_once` records the delay asked for in `nacks` but
does not wait it, so retry paths run quickly. `intake_limit` stands for a broker that
pulls ahead with one flow-control window (Pub/Sub's StreamingPull): once that many of its
messages are leased it hands out nothing more and `intake_full()` says so.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from app.broker.base import (
    PORTABLE_LIMITS,
    BacklogStats,
    Broker,
    BrokerCapabilities,
    BrokerUnavailable,
    IdempotencyConflict,
    MessageLimits,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)
from app.broker.registry import register
from app.messages.codec import encode_batch, new_batch_id
from app.schema.activity import Activity
from app.settings import Settings

PULL_POLL_SECONDS = 0.02  # how often a waiting pull looks again for ended leases and delays


@dataclass(eq=False)
class _Stored:
    message_id: str
    message: OutgoingMessage
    published_at: float  # time.time()
    attempts: int = 0
    visible_at: float = 0.0  # time.monotonic(); a nack's delay
    lease_owner: int | None = None
    lease_token: int = 0
    lease_ends: float = 0.0

    def leased(self, now: float) -> bool:
        return self.lease_owner is not None and now < self.lease_ends


@dataclass(frozen=True)
class MemoryDeadLetter:
    """A message the pipeline forwarded to the broker's dead-letter destination."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    published_at: float | None
    table: str
    reason: str
    ordering_key: str
    forwarded_by_pipeline: bool = True


@dataclass
class MemoryStream:
    """The state brokers on one stream share."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    keys: dict[str, list[_Stored]] = field(default_factory=dict)  # per ordering key, oldest first
    idempotency: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # key -> (fingerprint, batch id)
    dead_letters: list[MemoryDeadLetter] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    nacks: list[tuple[str, float]] = field(default_factory=list)  # (message id, delay asked for)
    max_leased: int = 0


_streams: dict[str, MemoryStream] = {}
_stream_lock = threading.Lock()


def stream_of(settings: Settings) -> MemoryStream:
    with _stream_lock:
        return _streams.setdefault(str(settings.broker_file), MemoryStream())


class MemoryBroker(Broker):
    _owners = itertools.count(1)

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        stream: MemoryStream | None = None,
        limits: MessageLimits = PORTABLE_LIMITS,
        one_run_per_key: bool = True,
        max_lease_seconds: float | None = None,
        max_ack_deadline_seconds: float | None = None,
        redeliver_nacked_at_once: bool = False,
        intake_limit: int | None = None,
    ) -> None:
        self.intake_limit = intake_limit
        self.settings = settings or Settings()
        self.stream = stream or MemoryStream()
        self.ack_deadline = float(self.settings.ack_deadline_seconds)
        self.redeliver_nacked_at_once = redeliver_nacked_at_once
        self.capabilities = BrokerCapabilities(
            message=limits,
            ordered_keys=one_run_per_key,
            remembers_idempotency_keys=True,
            min_ack_deadline_seconds=0.0,
            max_ack_deadline_seconds=max_ack_deadline_seconds,
            max_lease_seconds=max_lease_seconds,
            has_dead_letter_destination=True,
            reports_backlog=True,
        )
        self._owner = next(self._owners)
        self._tokens = itertools.count(1)
        self._closed = False

    @classmethod
    def open(cls, settings: Settings) -> MemoryBroker:
        """What the registry opens: a broker on the stream of `settings.broker_file`."""
        return cls(settings, stream=stream_of(settings))

    # ------------------------------------------------------------------ publish
    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> PublishResult:
        if self._closed:
            raise BrokerUnavailable("memory broker is closed")
        for m in messages:  # checked before anything is stored: all or nothing
            self._check_limits(m)
        with self.stream.cond:
            if idempotency_key is not None:
                seen = self.stream.idempotency.get(idempotency_key)
                if seen is not None:
                    if seen[0] != request_fingerprint:
                        raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used with another body")
                    return PublishResult(seen[1], 0, duplicate=True)
                self.stream.idempotency[idempotency_key] = (request_fingerprint, batch_id)
            self._store(messages)
        return PublishResult(batch_id, len(messages))

    def put(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Publish from a test's thread; the message ids, in order."""
        for m in messages:
            self._check_limits(m)
        with self.stream.cond:
            return self._store(messages)

    def put_activities(self, *activities: Activity) -> list[str]:
        return self.put(encode_batch(list(activities), new_batch_id(None), self.capabilities.message))

    def _store(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        ids = []
        now = time.time()
        for m in messages:
            message_id = str(next(self.stream.ids))
            self.stream.keys.setdefault(m.ordering_key, []).append(_Stored(message_id, m, now))
            ids.append(message_id)
        self.stream.cond.notify_all()
        return ids

    def _check_limits(self, m: OutgoingMessage) -> None:
        limits = self.capabilities.message
        too_long = [k for k, v in m.attributes.items()
                    if len(k.encode()) > limits.max_attribute_key_bytes
                    or len(v.encode()) > limits.max_attribute_value_bytes]
        if len(m.attributes) > limits.max_attributes or too_long or len(m.ordering_key.encode()) > limits.max_ordering_key_bytes:
            raise ValueError(f"message over the broker's limits (attributes {too_long or len(m.attributes)}, key {m.ordering_key!r})")

    # ------------------------------------------------------------------ subscribe
    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        if self._closed:
            raise BrokerUnavailable("memory broker is closed")
        deadline = time.monotonic() + timeout
        with self.stream.cond:
            while True:
                now = time.monotonic()
                out = self._deliverable(max_messages, now)
                if out or now >= deadline:
                    break
                self.stream.cond.wait(min(deadline - now, PULL_POLL_SECONDS))
            received = []
            for stored in out:
                stored.attempts += 1
                stored.lease_owner, stored.lease_token = self._owner, next(self._tokens)
                stored.lease_ends = now + (self.max_lease_seconds or self.ack_deadline)
                m = stored.message
                received.append(ReceivedMessage(
                    stored.message_id, m.data, dict(m.attributes), m.ordering_key, stored.attempts,
                    handle=(self._owner, stored.lease_token), published_at=stored.published_at,
                ))
            self.stream.max_leased = max(self.stream.max_leased, self._leased_count(now))
            return received

    def intake_full(self) -> bool:
        with self.stream.cond:
            return self.intake_limit is not None and self._leased_count(time.monotonic()) >= self.intake_limit

    def _deliverable(self, limit: int, now: float) -> list[_Stored]:
        if self.intake_limit is not None:
            limit = min(limit, self.intake_limit - self._leased_count(now))
        out: list[_Stored] = []
        for queue in self.stream.keys.values():
            if self.capabilities.ordered_keys and any(s.leased(now) for s in queue):
                continue
            for stored in queue:
                if len(out) >= limit:
                    return out
                if stored.leased(now):
                    continue
                if stored.visible_at > now:
                    if self.capabilities.ordered_keys:
                        break  # a delayed message holds back its key's later ones
                    continue
                out.append(stored)
        return out

    def _settle(self, messages: Sequence[ReceivedMessage]) -> list[_Stored]:
        """The stored messages whose lease these still are (a lost lease's ack is ignored)."""
        now = time.monotonic()
        settled = []
        for m in messages:
            for stored in self.stream.keys.get(m.ordering_key, []):
                if stored.message_id == m.message_id:
                    if stored.leased(now) and (stored.lease_owner, stored.lease_token) == m.handle:
                        stored.lease_owner = None
                        settled.append(stored)
                    break
        return settled

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        with self.stream.cond:
            for stored in self._settle(messages):
                queue = self.stream.keys[stored.message.ordering_key]
                queue.remove(stored)
                if not queue:
                    del self.stream.keys[stored.message.ordering_key]
                self.stream.acked.append(stored.message_id)
            self.stream.cond.notify_all()

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        with self.stream.cond:
            wait = 0.0 if self.redeliver_nacked_at_once else delay_seconds
            if self.capabilities.max_ack_deadline_seconds is not None:
                wait = min(wait, self.capabilities.max_ack_deadline_seconds)
            for stored in self._settle(messages):
                stored.visible_at = time.monotonic() + wait
                self.stream.nacks.append((stored.message_id, delay_seconds))
            self.stream.cond.notify_all()

    # ------------------------------------------------------------------ both
    def ready(self) -> tuple[bool, str]:
        return (False, "memory broker closed") if self._closed else (True, "ok")

    def backlog(self) -> BacklogStats:
        with self.stream.cond:
            stored = [s for queue in self.stream.keys.values() for s in queue]
        oldest = min((s.published_at for s in stored), default=None)
        return BacklogStats(len(stored), None if oldest is None else time.time() - oldest)

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        with self.stream.cond:
            for m, reason in entries:
                self.stream.dead_letters.append(MemoryDeadLetter(
                    m.message_id, m.data, dict(m.attributes), time.time(),
                    m.attributes.get("table") or m.ordering_key, reason, m.ordering_key,
                ))

    def dead_letter_source(self) -> MemoryDeadLetters:
        return MemoryDeadLetters(self)

    def close(self) -> None:
        """Give back this broker's leases; publish and pull refuse from now on."""
        with self.stream.cond:
            self._closed = True
            for queue in self.stream.keys.values():
                for stored in queue:
                    if stored.lease_owner == self._owner:
                        stored.lease_owner = None
            self.stream.cond.notify_all()

    # ------------------------------------------------------------------ for tests
    @property
    def acked(self) -> list[str]:
        with self.stream.cond:
            return list(self.stream.acked)

    @property
    def nacks(self) -> list[tuple[str, float]]:
        with self.stream.cond:
            return list(self.stream.nacks)

    @property
    def max_leased(self) -> int:
        return self.stream.max_leased

    @property
    def leased(self) -> int:
        with self.stream.cond:
            return self._leased_count(time.monotonic())

    @property
    def unacked(self) -> int:
        with self.stream.cond:
            return sum(len(queue) for queue in self.stream.keys.values())

    def _leased_count(self, now: float) -> int:
        return sum(s.leased(now) for queue in self.stream.keys.values() for s in queue)


class MemoryDeadLetters:
    """The memory broker's dead-letter destination (`Broker.dead_letter_source`)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.path = f"memory:{broker.settings.broker_file}:dead-letter"

    def list(self, limit: int = 50) -> list[MemoryDeadLetter]:
        with self.broker.stream.cond:
            return list(self.broker.stream.dead_letters[:limit])

    def replay(self, limit: int = 1000, *, include_forwarded: bool = False) -> tuple[int, int]:
        with self.broker.stream.cond:
            letters = self.broker.stream.dead_letters
            chosen = [d for d in letters[:limit] if include_forwarded or not d.forwarded_by_pipeline]
            self.broker.stream.dead_letters = [d for d in letters if d not in chosen]
            left = len(self.broker.stream.dead_letters)
        asyncio.run(self.broker.publish(
            [OutgoingMessage(d.data, d.ordering_key, dict(d.attributes)) for d in chosen], batch_id="replay"
        ))
        return len(chosen), left

    def close(self) -> None:
        pass


register("memory", MemoryBroker.open)
