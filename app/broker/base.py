"""The broker seam: what the API publishes to and the subscriber pulls from.

Both backends (`local`, `pubsub`) give Pub/Sub semantics so the subscriber is the same
code for either: at-least-once delivery, an ack deadline after which unacked messages
come back, FIFO per ordering key (the table), and a delivery-attempt counter that the
pipeline uses to dead-letter messages that keep failing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence


class BrokerUnavailable(Exception):
    """The broker cannot take or give messages right now (answered as 503 / retried)."""


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


class Broker(abc.ABC):
    """A durable message stream with Pub/Sub semantics."""

    name: str = "abstract"
    # How long a pulled message stays leased while the subscriber holds it: the broker
    # keeps extending the lease up to this many seconds. None: it does not extend, the
    # lease ends after the ack deadline (`ACK_DEADLINE_SECONDS`).
    max_lease_seconds: float | None = None

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
        """Give these back for redelivery after `delay_seconds`."""

    # --- both ---
    @abc.abstractmethod
    def ready(self) -> tuple[bool, str]:
        """(reachable, reason) for /readyz."""

    def backlog(self) -> BacklogStats | None:
        """Messages waiting and the oldest one's age, if the backend can tell cheaply."""
        return None

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Also hand messages that were dead-lettered (with their reasons) to the broker's own
        dead-letter destination, if it has one. The dead-letter store already holds them, so
        this is best effort. Local: the store is the only destination; nothing to do."""

    def start_subscriber(self) -> None:
        """Open the subscriber side (background Pull and lease keeper for Pub/Sub). Local: nothing to do."""

    def close(self) -> None:
        """Release connections; pending leases return to the broker."""
