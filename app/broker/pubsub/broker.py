"""`PubSubBroker`: the `Broker` interface over the publisher and the puller."""

from __future__ import annotations

import threading
from typing import Any, Sequence

from app.broker.base import (
    Broker,
    BrokerCapabilities,
    BrokerUnavailable,
    MessageLimits,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)
from app.broker.pubsub.clients import make_subscriber, probe_permission
from app.broker.pubsub.deadletters import DeadLetterSubscription
from app.broker.pubsub.publisher import ATTRIBUTE_VALUE_MAX_BYTES, Publisher
from app.broker.pubsub.pull import MAX_ACK_DEADLINE, MIN_ACK_DEADLINE, Puller
from app.settings import Settings

JOIN_TIMEOUT = 12.0


def capabilities(settings: Settings) -> BrokerCapabilities:
    # Pub/Sub's resource limits: https://cloud.google.com/pubsub/quotas#resource_limits
    # (a message and a publish request of at most 10 MB including attributes; at most 100
    # attributes, keys of 256 bytes, values and the ordering key of 1,024 bytes; ack
    # deadlines of 10..600 s).
    return BrokerCapabilities(
        message=MessageLimits(
            max_message_bytes=8 * 1024 * 1024,  # bodies stay well below 10 MB, leaving room for attributes
            max_attributes=100,
            max_attribute_key_bytes=256,
            max_attribute_value_bytes=ATTRIBUTE_VALUE_MAX_BYTES,
            max_ordering_key_bytes=1024,
        ),
        ordered_keys=settings.pubsub_ordering,
        remembers_idempotency_keys=False,  # a retried request's dedup ids are dropped by the warehouse
        min_ack_deadline_seconds=float(MIN_ACK_DEADLINE),
        max_ack_deadline_seconds=float(MAX_ACK_DEADLINE),
        max_lease_seconds=float(settings.pubsub_max_lease_seconds),  # the pull keeps leases this long
        has_dead_letter_destination=True,  # `<topic>-dead-letter`, see app.provision
        reports_backlog=False,  # a Cloud Monitoring metric, not an API call
    )


class PubSubBroker(Broker):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.capabilities = capabilities(settings)
        self.project = settings.gcp_project
        self.topic_path = f"projects/{settings.gcp_project}/topics/{settings.pubsub_topic}"
        self.subscription_path = f"projects/{settings.gcp_project}/subscriptions/{settings.pubsub_subscription}"
        self._publisher = Publisher(settings, self.topic_path)
        self._puller = Puller(settings, self.subscription_path, lambda: self.subscriber)
        self._lock = threading.Lock()
        self._subscriber: Any = None
        self._closed = False

    @property
    def subscriber(self):
        with self._lock:
            if self._subscriber is None:
                self._subscriber = make_subscriber(self.settings)
            return self._subscriber

    # ------------------------------------------------------------------ publish
    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> PublishResult:
        """Publish all messages and wait until Pub/Sub has them all, or raise BrokerUnavailable.

        Pub/Sub cannot dedupe publishes: the batch id (derived from the Idempotency-Key
        and the body's fingerprint, see app.messages.codec) makes the `dedup_id`s of a
        retried request equal, and the warehouse drops the copies.
        """
        if not messages:
            return PublishResult(batch_id, 0)
        if self._closed:
            raise BrokerUnavailable("pubsub broker is closed")
        await self._publisher.publish(messages)
        return PublishResult(batch_id, len(messages))

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        self._publisher.forward_dead_letters(entries)

    def dead_letter_source(self) -> DeadLetterSubscription:
        """The dead-letter subscription `<subscription>-dead-letter` (its own client)."""
        return DeadLetterSubscription(self.settings)

    # ------------------------------------------------------------------ subscribe
    def start_subscriber(self) -> None:
        """Start pulling in the background (idempotent). Needs no metadata call: a missing
        subscription or permission shows as BrokerUnavailable from `pull()`."""
        if self._closed:
            raise BrokerUnavailable("pubsub broker is closed")
        self._puller.start()

    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        """Up to `max_messages` held messages, each key's run in order, waiting up to
        `timeout` for the first."""
        if self._closed:
            raise BrokerUnavailable("pubsub broker is closed")
        return self._puller.pull(max_messages, timeout)

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        if messages:
            self._puller.ack(messages)

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Give back for redelivery at once: the subscription's retry policy spaces the
        redeliveries, not `delay_seconds` (a delay held as an ack deadline would keep the
        messages outstanding, against the stream's flow control; see `pull`)."""
        if messages:
            self._puller.nack(messages, delay_seconds)

    # ------------------------------------------------------------------ both
    def ready(self) -> tuple[bool, str]:
        """Subscriber process: the last Pull worked and we may consume; API: we may publish."""
        if self._closed:
            return False, "pubsub broker closed"
        if self._puller.started:
            error = self._puller.error
            if error is not None:
                return False, f"pubsub pull failing: {type(error).__name__}: {error}"
            client = self.subscriber
            return probe_permission(
                client, self.subscription_path, "pubsub.subscriptions.consume",
                lambda: client.get_subscription(request={"subscription": self.subscription_path}, timeout=3.0, retry=None),
            )
        try:
            client = self._publisher.client
        except Exception as exc:  # e.g. no credentials
            return False, f"pubsub publisher unavailable: {type(exc).__name__}: {exc}"
        return probe_permission(
            client, self.topic_path, "pubsub.topics.publish",
            lambda: client.get_topic(request={"topic": self.topic_path}, timeout=3.0, retry=None),
        )

    def intake_full(self) -> bool:
        return self._puller.intake_full()

    def backlog(self) -> None:
        """Not available cheaply: Pub/Sub's backlog is the Cloud Monitoring metric
        `pubsub.googleapis.com/subscription/num_undelivered_messages`."""
        return None

    def close(self) -> None:
        """Stop pulling (giving back what the pipeline never took) and flush/stop the publisher."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriber = self._subscriber
        self._puller.close()
        if subscriber is not None:
            try:
                subscriber.close()  # ends a long-poll Pull in flight
            except Exception:
                pass
        self._puller.join(JOIN_TIMEOUT)
        self._publisher.close()

