"""The broker seam: what the API publishes to and the subscriber pulls from.

Every backend gives Pub/Sub semantics so the subscriber is the same code for any:
at-least-once delivery, an ack deadline after which unacked messages come back, FIFO
per ordering key (the table), and a delivery-attempt counter that the pipeline uses to
dead-letter messages that keep failing. What differs between backends (size limits,
ack deadlines, idempotency keys, a dead-letter destination of their own) is data:
`Broker.capabilities`, so shared code reads a field instead of asking which broker runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


class BrokerUnavailable(Exception):
    """The broker cannot take or give messages right now (answered as 503 / retried).

    `maybe_published`: some of the messages were handed to the broker without its answer
    (a timeout, a dropped connection), so they may still land; a client retrying with the
    same Idempotency-Key gets the same dedup ids, which the warehouse applies once.
    """

    def __init__(self, *args: object, maybe_published: bool = False) -> None:
        super().__init__(*args)
        self.maybe_published = maybe_published


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request body."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish: a (request, table) chunk of activities."""

    data: bytes
    ordering_key: str
    attributes: dict[str, str]


@dataclass(slots=True)
class ReceivedMessage:
    """A delivered, not yet acknowledged message.

    `message_id` is the broker's id; `attributes["dedup_id"]` is the id the warehouse
    records so a redelivered or re-published copy is applied once.
    """

    message_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    delivery_attempt: int
    handle: Any = field(default=None, repr=False)  # backend-specific ack handle
    # time.monotonic() of the delivery, set by brokers that lease per delivery: the
    # subscriber's lease guard counts from here, not from when a worker got it.
    received_at: float | None = None
    # Unix time the broker accepted the message (Pub/Sub's `publish_time`, the local
    # broker's commit), when it says: the start of the end-to-end lag.
    published_at: float | None = None
    # Set by the broker when it learns the lease is gone (another copy may be with
    # another replica): the subscriber must stop working on it.
    lease_lost: bool = False

    @property
    def dedup_id(self) -> str:
        return self.attributes.get("dedup_id") or self.message_id


@dataclass(frozen=True, slots=True)
class PublishResult:
    batch_id: str
    message_count: int
    duplicate: bool = False  # True when the Idempotency-Key was seen before and nothing was published


@dataclass(frozen=True, slots=True)
class BacklogStats:
    messages: int
    oldest_age_seconds: float | None


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What one message may be; the codec keeps to these."""

    max_message_bytes: int  # largest body the codec writes (a run too big is cut by rows)
    max_attributes: int
    max_attribute_key_bytes: int
    max_attribute_value_bytes: int  # a longer `dedup_id` is replaced by its hash
    max_ordering_key_bytes: int


# Limits every built-in broker takes: what a message keeps to when no broker is at hand
# (tools, benchmarks), so it can be published to any of them.
PORTABLE_LIMITS = MessageLimits(
    max_message_bytes=8 * 1024 * 1024,
    max_attributes=100,
    max_attribute_key_bytes=256,
    max_attribute_value_bytes=1024,
    max_ordering_key_bytes=1024,
)


@dataclass(frozen=True, slots=True)
class BrokerCapabilities:
    """What a broker takes and promises, read by shared code (codec, API, subscriber, CLI)."""

    message: MessageLimits
    # --- delivery ---
    ordered_keys: bool  # FIFO per ordering key, a key with leased messages held back
    remembers_idempotency_keys: bool  # publish answers a repeated key itself (duplicate / conflict)
    min_ack_deadline_seconds: float  # shortest lease (and so shortest redelivery) it accepts
    max_ack_deadline_seconds: float | None  # longest lease or nack delay in one go; None: no limit
    # How long a pulled message stays leased while the subscriber holds it: the broker
    # keeps extending the lease up to this many seconds. None: it does not extend, the
    # lease ends after the ack deadline (`ACK_DEADLINE_SECONDS`).
    max_lease_seconds: float | None
    # --- operations ---
    has_dead_letter_destination: bool  # `dead_letter_source()` lists and replays it
    reports_backlog: bool  # `backlog()` answers cheaply (else None)


class DeadLetter(Protocol):
    """One message on a broker's own dead-letter destination, as `dead-letters *-list` shows it."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    published_at: float | None

    @property
    def table(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def forwarded_by_pipeline(self) -> bool: ...


class DeadLetterSource(Protocol):
    """A broker's own dead-letter destination: what the broker dead-lettered by itself, and
    what the pipeline forwarded there (`Broker.forward_dead_letters`)."""

    path: str  # where it lives, for people

    def list(self, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, left where they are."""

    def replay(self, limit: int, *, include_forwarded: bool = False) -> tuple[int, int]:
        """Re-publish up to `limit` to the main stream and remove them; (replayed, left).
        Forwarded ones are in the dead-letter store too, so they stay unless included."""

    def close(self) -> None: ...


class Broker(abc.ABC):
    """A durable message stream with Pub/Sub semantics."""

    # The registry names what it opens (`app.broker.registry`); a broker made directly
    # keeps this.
    name: str = "unnamed"
    capabilities: BrokerCapabilities

    @property
    def max_lease_seconds(self) -> float | None:
        return self.capabilities.max_lease_seconds

    # --- publisher side (API process) ---
    @abc.abstractmethod
    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> PublishResult:
        """Publish all messages or none; return only once they are durable.

        Raises `BrokerUnavailable` if the broker cannot take them (nothing half-published),
        `IdempotencyConflict` if the key was used before with another fingerprint.
        """

    # --- subscriber side ---
    @abc.abstractmethod
    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        """Lease up to `max_messages`, waiting at most `timeout` seconds for the first one.

        Per ordering key, messages come in publish order and a key with leased messages
        gives no more until they are acked or their lease ends.
        """

    @abc.abstractmethod
    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Done with these: never deliver them again."""

    @abc.abstractmethod
    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Give these back for redelivery after about `delay_seconds` (a broker may space
        redeliveries by its own policy instead: Pub/Sub's subscription retry policy)."""

    # --- both ---
    @abc.abstractmethod
    def ready(self) -> tuple[bool, str]:
        """(reachable, reason) for /readyz."""

    def backlog(self) -> BacklogStats | None:
        """Messages waiting and the oldest one's age, when `capabilities.reports_backlog`."""
        return None

    def intake_full(self) -> bool:
        """True while `pull()` can get nothing more because the broker's own hold is full
        of messages of keys the subscriber already holds (a broker that pulls ahead, with
        one flow-control window for all keys). The subscriber then hands back what tables
        waiting for a retry hold, so the other tables' messages can come."""
        return False

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Also hand messages that were dead-lettered (with their reasons) to the broker's own
        dead-letter destination, if it has one. The dead-letter store already holds them, so
        this is best effort. Without one the store is the only destination: nothing to do."""

    def dead_letter_source(self) -> DeadLetterSource | None:
        """The broker's own dead-letter destination (`capabilities.has_dead_letter_destination`),
        or None."""
        return None

    def start_subscriber(self) -> None:
        """Open the subscriber side (e.g. a background Pull and lease keeper); nothing by default."""

    def close(self) -> None:
        """Release connections; pending leases return to the broker."""
