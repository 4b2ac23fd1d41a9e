"""Listing and replaying the Pub/Sub dead-letter subscription.

Two kinds of message end up on `<topic>-dead-letter`:
- *Pub/Sub's own*: the subscription's dead-letter policy forwarded a message after
  `max_delivery_attempts` deliveries. Pub/Sub adds `CloudPubSubDeadLetterSource*`
  attributes (https://cloud.google.com/pubsub/docs/handling-failures). The pipeline never
  saw it fail terminally, so it is in no other store: `replay` re-publishes its data and
  original attributes (same `dedup_id`, so a copy that did apply is dropped by the
  warehouse) to the main topic under its ordering key, then acks it here.
- *forwarded by the pipeline* (`dead_letter_reason` attribute): a whole message it gave
  up on, or one activity the warehouse refused (`dead_letter_kind` = `activity`: a
  message of that one activity, whose batch id derives from where it was refused, so
  replayed from here and from the store it applies once). They are in the replica's
  dead-letter store too, whose `dead-letters replay` checks them against the current
  schema; `replay` here leaves them alone unless asked to include them (a replica whose
  disk was lost has only these).

Pub/Sub has no peek: `list` pulls messages and gives them straight back (ack deadline 0).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from app.broker.base import OutgoingMessage
from app.broker.pubsub.clients import DEAD_LETTER_SUFFIX, make_subscriber
from app.broker.pubsub.publisher import Publisher
from app.messages.deadletters import KIND_ATTRIBUTE
from app.settings import Settings

PUBSUB_SOURCE_PREFIX = "CloudPubSubDeadLetterSource"
FORWARDED_PREFIX = "dead_letter_"
PULL_TIMEOUT = 10.0
SETTLE_TIMEOUT = 60.0
PULL_BATCH = 1000


def dead_letter_subscription_path(settings: Settings) -> str:
    """The dead-letter subscription app.provision creates: `<subscription>-dead-letter`."""
    return f"projects/{settings.gcp_project}/subscriptions/{settings.pubsub_subscription}{DEAD_LETTER_SUFFIX}"


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    message_id: str
    ack_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    published_at: float | None  # unix time it reached the dead-letter topic

    @property
    def forwarded_by_pipeline(self) -> bool:
        return f"{FORWARDED_PREFIX}reason" in self.attributes

    @property
    def reason(self) -> str:
        if self.forwarded_by_pipeline:
            return self.attributes[f"{FORWARDED_PREFIX}reason"]
        count = self.attributes.get(f"{PUBSUB_SOURCE_PREFIX}DeliveryCount", "?")
        return f"Pub/Sub dead-lettered it after {count} delivery attempts"

    @property
    def kind(self) -> str:
        """`activity` for one refused activity, `message` for a whole message."""
        return self.attributes.get(KIND_ATTRIBUTE, "message")

    @property
    def table(self) -> str:
        return self.attributes.get("table") or self.ordering_key

    def original(self) -> OutgoingMessage:
        """The message as the API published it: our and Pub/Sub's dead-letter attributes off."""
        attributes = {
            k: v for k, v in self.attributes.items()
            if not k.startswith((PUBSUB_SOURCE_PREFIX, FORWARDED_PREFIX))
        }
        return OutgoingMessage(data=self.data, ordering_key=self.ordering_key or self.table, attributes=attributes)


class DeadLetterSubscription:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = dead_letter_subscription_path(settings)
        self._client: Any = None

    @property
    def client(self):
        if self._client is None:
            self._client = make_subscriber(self.settings)
        return self._client

    def _lease(self, limit: int) -> list[DeadLetterMessage]:
        """Pull up to `limit` messages (several Pulls; stops at an empty answer)."""
        from google.api_core import exceptions as gexc

        got: dict[str, DeadLetterMessage] = {}
        while len(got) < limit:
            try:
                response = self.client.pull(
                    request={"subscription": self.path, "max_messages": min(PULL_BATCH, limit - len(got))},
                    timeout=PULL_TIMEOUT,
                )
            except gexc.DeadlineExceeded:
                break
            if not response.received_messages:
                break
            for r in response.received_messages:
                m = r.message
                published = m.publish_time.timestamp() if m.publish_time else None
                got.setdefault(
                    m.message_id,
                    DeadLetterMessage(m.message_id, r.ack_id, bytes(m.data), dict(m.attributes), m.ordering_key, published),
                )
        return list(got.values())

    def _modack(self, messages: list[DeadLetterMessage], seconds: int) -> None:
        for i in range(0, len(messages), PULL_BATCH):
            chunk = [m.ack_id for m in messages[i : i + PULL_BATCH]]
            self.client.modify_ack_deadline(
                request={"subscription": self.path, "ack_ids": chunk, "ack_deadline_seconds": seconds},
                timeout=SETTLE_TIMEOUT,
            )

    def list(self, limit: int = 50) -> list[DeadLetterMessage]:
        """Up to `limit` dead letters, oldest first; all are given back at once."""
        messages = self._lease(limit)
        if messages:
            self._modack(messages, 0)
        return sorted(messages, key=lambda m: m.published_at or 0.0)

    def replay(self, limit: int = 1000, *, include_forwarded: bool = False) -> tuple[int, int]:
        """Re-publish up to `limit` dead letters to the main topic, then ack them here.

        Returns (replayed, left): left are the pipeline's forwarded ones (unless included)
        and any whose publish failed; they are given back untouched.
        """
        messages = sorted(self._lease(limit), key=lambda m: m.published_at or 0.0)
        chosen = [m for m in messages if include_forwarded or not m.forwarded_by_pipeline]
        left = [m for m in messages if m not in chosen]
        publisher = Publisher(self.settings, f"projects/{self.settings.gcp_project}/topics/{self.settings.pubsub_topic}")
        replayed: list[DeadLetterMessage] = []
        failed_keys: set[str] = set()
        try:
            for m in chosen:  # one by one, oldest first; after a failure its key stops, keeping order
                original = m.original()
                if original.ordering_key in failed_keys:
                    left.append(m)
                    continue
                try:
                    asyncio.run(publisher.publish([original]))
                except Exception:
                    failed_keys.add(original.ordering_key)
                    left.append(m)
                    continue
                replayed.append(m)
        finally:
            publisher.close()
        for i in range(0, len(replayed), PULL_BATCH):
            self.client.acknowledge(
                request={"subscription": self.path, "ack_ids": [m.ack_id for m in replayed[i : i + PULL_BATCH]]},
                timeout=SETTLE_TIMEOUT,
            )
        if left:
            self._modack(left, 0)
        return len(replayed), len(left)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass

