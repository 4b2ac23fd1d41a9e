"""Publisher side of the Pub/Sub broker (API process, replay and dead-letter forwarding).

One `PublisherClient` with tuned batching, message ordering (`ordering key = table`)
when `PUBSUB_ORDERING` is on, and bounded flow control that *errors* instead of blocking
(a blocked publish would stall the API's event loop). `publish()` waits for every
message's future, re-publishing failed ones (per key in their original order, after
`PausedKeys` resumed the key) until `PUBLISH_TIMEOUT_SECONDS`, then raises
`BrokerUnavailable` (answered as 503).

Publishing is not transactional: if one message of a request fails, others may already
be published, and a publish that timed out on our side may still land. A retry with the
same Idempotency-Key and body re-publishes the same `dedup_id`s, which the warehouse drops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Sequence

from app.broker.base import BrokerUnavailable, OutgoingMessage, ReceivedMessage
from app.broker.pubsub.clients import DEAD_LETTER_SUFFIX, make_publisher
from app.broker.pubsub.ordering import PausedKeys
from app.settings import Settings

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = 30.0
# What forwarding sets (a message dead-lettered again gets fresh ones).
FORWARD_ATTRIBUTES = ("dead_letter_reason", "dead_letter_source_message_id")
# Pub/Sub's limit on one attribute value; reasons are cut to fit.
# https://cloud.google.com/pubsub/quotas#resource_limits
ATTRIBUTE_VALUE_MAX_BYTES = 1024


def retryable(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc
    from google.cloud.pubsub_v1.publisher import exceptions as pexc

    return isinstance(
        exc,
        (
            gexc.ServiceUnavailable,
            gexc.InternalServerError,
            gexc.Aborted,
            gexc.ResourceExhausted,
            gexc.Unknown,
            gexc.DeadlineExceeded,
            gexc.Cancelled,
            gexc.RetryError,
            pexc.PublishToPausedOrderingKeyException,
            pexc.FlowControlLimitError,
            TimeoutError,
        ),
    )


class Publisher:
    def __init__(self, settings: Settings, topic_path: str) -> None:
        self.settings = settings
        self.topic_path = topic_path
        self.ordering = settings.pubsub_ordering
        self.paused_keys = PausedKeys(topic_path, self.ordering)
        self._lock = threading.Lock()
        self._client: Any = None

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = make_publisher(self.settings)
            return self._client

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Return once Pub/Sub has every message, or raise BrokerUnavailable."""
        deadline = time.monotonic() + self.settings.publish_timeout_seconds
        pending = list(messages)
        delay = 0.05
        last_error: BaseException | None = None
        handed_over = False  # some message reached the client library: it may still publish
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            failed, last_error, fatal, sent = await self._publish_once(pending, remaining)
            handed_over = handed_over or sent
            if not failed:
                return
            self.paused_keys.resume(self._client, (m.ordering_key for m in failed))
            if fatal:
                break
            pending = failed
            remaining = deadline - time.monotonic()
            if remaining <= delay:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        # A publish that timed out or failed in flight may still be stored by Pub/Sub
        # (https://cloud.google.com/pubsub/docs/publisher#retry: retried publishes can
        # duplicate), so the API must not answer "nothing was accepted".
        raise BrokerUnavailable(
            f"pubsub publish to {self.topic_path} failed: {last_error!r}", maybe_published=handed_over
        ) from last_error

    async def _publish_once(
        self, messages: Sequence[OutgoingMessage], timeout: float
    ) -> tuple[list[OutgoingMessage], BaseException | None, bool, bool]:
        """One attempt: returns (failed messages in order, an error, whether it is not worth
        retrying, whether any message was handed to the client library).

        `retry=None` and a per-RPC timeout keep every future bounded: with ordering the
        library would otherwise retry transient errors forever in the background.
        """
        try:
            publisher = self.client
        except Exception as exc:  # e.g. no credentials
            return list(messages), exc, True, False
        futures: list[asyncio.Future] = []
        failed: list[OutgoingMessage] = []
        error: BaseException | None = None
        fatal = False
        for m in messages:
            try:
                f = publisher.publish(
                    self.topic_path,
                    m.data,
                    ordering_key=m.ordering_key if self.ordering else "",
                    retry=None,
                    timeout=timeout,
                    **m.attributes,
                )
            except Exception as exc:  # stopped publisher, bad attribute, message too large
                for f in futures:
                    f.cancel()  # only our wrapper; what was handed over may still publish
                return list(messages), exc, True, bool(futures)
            futures.append(asyncio.wrap_future(f))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            return list(messages), TimeoutError(f"no answer within {timeout:.1f}s"), False, True
        for m, r in zip(messages, results):
            if isinstance(r, BaseException):
                failed.append(m)
                if error is None or not isinstance(error, type(r)):
                    error = r
                if not retryable(r):
                    fatal = True
        return failed, error, fatal, True

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Publish dead-lettered messages to `<topic>-dead-letter` with the reason attached.

        The subscription's own dead-letter policy only fires when Pub/Sub counts too many
        deliveries; messages the pipeline gives up on earlier (undecodable, rejected after
        N attempts) are acked, so they are forwarded here to reach the same topic, and so
        are single activities the warehouse refused (`rejected_activity_message`, marked
        by their `dead_letter_kind`). Raises if any publish fails: the caller then keeps
        the source message unacked.
        """
        if not entries:
            return
        topic = f"{self.topic_path}{DEAD_LETTER_SUFFIX}"
        futures = []
        for message, reason in entries:
            attributes = {k: v for k, v in message.attributes.items() if k not in FORWARD_ATTRIBUTES}
            attributes["dead_letter_reason"] = fit_attribute(reason)
            attributes["dead_letter_source_message_id"] = message.message_id
            futures.append(
                self.client.publish(
                    topic, bytes(message.data), ordering_key="", retry=None, timeout=FORWARD_TIMEOUT, **attributes
                )
            )
        for f in futures:
            f.result(timeout=FORWARD_TIMEOUT)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        try:
            client.stop()  # sends what is still batched; publish() already awaited its futures
        except Exception:
            log.debug("publisher stop failed", exc_info=True)
        try:
            client.transport.close()
        except Exception:
            pass


def fit_attribute(value: str, limit: int = ATTRIBUTE_VALUE_MAX_BYTES) -> str:
    """`value` cut to at most `limit` UTF-8 bytes, never inside a character."""
    return value.encode()[:limit].decode("utf-8", "ignore")
