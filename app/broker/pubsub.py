"""Google Cloud Pub/Sub backend.

Publisher (API process): one `PublisherClient` with tuned batching, message ordering
(`ordering key = table`) when `PUBSUB_ORDERING` is on, and bounded publisher flow control
that *errors* instead of blocking (a blocked publish would stall the API's event loop).
`publish()` waits for every message's publish future, retrying transient failures until
`PUBLISH_TIMEOUT_SECONDS`, then raises `BrokerUnavailable` (answered as 503).

Subscriber: a streaming pull whose callback drops messages into a thread-safe queue;
`pull()` drains it. The client library keeps extending leases of messages we hold, so a
message comes back only when nacked, or when the process dies (after about the
subscription's ack deadline), or after `MAX_LEASE_SECONDS`.

Emulator: `PUBSUB_EMULATOR_HOST=host:port` (env, or a `pubsub_emulator_host` setting if
Settings grows one) switches both clients to an insecure channel with anonymous credentials.

Caveats (Pub/Sub itself):
- Publishing is not transactional: if one message of a request fails, others may already
  be published, and a publish that timed out on our side may still land. Retrying with
  the same Idempotency-Key re-publishes the same `dedup_id`s, which the warehouse drops.
- With ordering, a failed publish pauses its ordering key in the client; `publish()`
  resumes the key and re-publishes the failed messages (in order) within the timeout.
- With ordering, the client hands over one message per key at a time (the next only after
  ack/nack), so a pull holds at most one message per table.
- Backlog size is a Cloud Monitoring metric (`subscription/num_undelivered_messages`),
  not an API call: `backlog()` returns None.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import Any, Sequence

from app.broker.base import (
    Broker,
    BrokerUnavailable,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)
from app.settings import Settings

log = logging.getLogger(__name__)

# Pub/Sub limits: a publish request holds at most 1000 messages and 10 MB.
BATCH_MAX_MESSAGES = 1000
BATCH_MAX_BYTES = 9 * 1024 * 1024
BATCH_MAX_LATENCY = 0.01  # seconds
# Publisher flow control: messages/bytes waiting to be published, across all requests.
FLOW_MAX_MESSAGES = 10_000
FLOW_MAX_BYTES = 256 * 1024 * 1024
# Subscriber: messages received but not yet acked/nacked (queue + leased to the pipeline).
MAX_LEASE_SECONDS = 600.0
READY_TIMEOUT = 3.0
MAX_MODACK_SECONDS = 600


# Suffix of the dead-letter topic and its subscription (provisioned by app.provision).
DEAD_LETTER_SUFFIX = "-dead-letter"


def emulator_host(settings: Settings) -> str | None:
    """The Pub/Sub emulator's host:port, from Settings (if it has the field) or the env."""
    return getattr(settings, "pubsub_emulator_host", None) or os.environ.get("PUBSUB_EMULATOR_HOST") or None


def client_kwargs(settings: Settings, transport_cls: Any) -> dict[str, Any]:
    """Extra client arguments: an insecure channel to the emulator when one is configured.

    The library already does this when PUBSUB_EMULATOR_HOST is in the environment; doing
    it here too covers a host that only comes from Settings.
    """
    host = emulator_host(settings)
    if not host:
        return {}
    import grpc

    return {"transport": transport_cls(channel=grpc.insecure_channel(host))}


def make_publisher(settings: Settings, *, ordering: bool | None = None):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    types = pubsub_v1.types
    return pubsub_v1.PublisherClient(
        batch_settings=types.BatchSettings(
            max_bytes=BATCH_MAX_BYTES, max_latency=BATCH_MAX_LATENCY, max_messages=BATCH_MAX_MESSAGES
        ),
        publisher_options=types.PublisherOptions(
            enable_message_ordering=settings.pubsub_ordering if ordering is None else ordering,
            flow_control=types.PublishFlowControl(
                message_limit=FLOW_MAX_MESSAGES,
                byte_limit=FLOW_MAX_BYTES,
                limit_exceeded_behavior=types.LimitExceededBehavior.ERROR,
            ),
        ),
        **client_kwargs(settings, PublisherGrpcTransport),
    )


def make_subscriber(settings: Settings):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(**client_kwargs(settings, SubscriberGrpcTransport))


def _retryable(exc: BaseException) -> bool:
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


class PubSubBroker(Broker):
    name = "pubsub"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ordering = settings.pubsub_ordering
        self.project = settings.gcp_project
        self.topic_path = f"projects/{settings.gcp_project}/topics/{settings.pubsub_topic}"
        self.subscription_path = f"projects/{settings.gcp_project}/subscriptions/{settings.pubsub_subscription}"
        self._lock = threading.Lock()
        self._publisher: Any = None
        self._subscriber: Any = None
        self._streaming: Any = None  # StreamingPullFuture
        self._queue: queue.Queue[Any] = queue.Queue()
        self._exactly_once = False
        self._closed = False
        # ordering key -> (message_id of a nacked message, give-up time): see pull().
        self._blocked: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------------ clients
    @property
    def publisher(self):
        with self._lock:
            if self._publisher is None:
                self._publisher = make_publisher(self.settings)
            return self._publisher

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

        Pub/Sub cannot dedupe publishes: the idempotency key is not used here; the
        `dedup_id` attributes (derived from it) let the warehouse drop re-published copies.
        Failed messages are re-published (per ordering key in their original order) until
        `publish_timeout_seconds` is spent.
        """
        if not messages:
            return PublishResult(batch_id, 0)
        if self._closed:
            raise BrokerUnavailable("pubsub broker is closed")
        deadline = time.monotonic() + self.settings.publish_timeout_seconds
        pending = list(messages)
        delay = 0.05
        last_error: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            failed, last_error, fatal = await self._publish_once(pending, remaining)
            if not failed:
                return PublishResult(batch_id, len(messages))
            self._resume(failed)
            if fatal:
                break
            pending = failed
            remaining = deadline - time.monotonic()
            if remaining <= delay:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise BrokerUnavailable(f"pubsub publish to {self.topic_path} failed: {last_error!r}") from last_error

    async def _publish_once(
        self, messages: Sequence[OutgoingMessage], timeout: float
    ) -> tuple[list[OutgoingMessage], BaseException | None, bool]:
        """One attempt: returns (failed messages in order, an error, whether it is not worth retrying).

        `retry=None` and a per-RPC timeout keep every future bounded: with ordering the
        library would otherwise retry transient errors forever in the background.
        """
        try:
            publisher = self.publisher
        except Exception as exc:  # e.g. no credentials
            return list(messages), exc, True
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
                return list(messages), exc, True
            futures.append(asyncio.wrap_future(f))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            return list(messages), TimeoutError(f"no answer within {timeout:.1f}s"), False
        for m, r in zip(messages, results):
            if isinstance(r, BaseException):
                failed.append(m)
                if error is None or not isinstance(error, type(r)):
                    error = r
                if not _retryable(r):
                    fatal = True
        return failed, error, fatal

    def _resume(self, messages: Sequence[OutgoingMessage]) -> None:
        """A failed ordered publish pauses its key in the client; unpause so it can be retried."""
        if not self.ordering or self._publisher is None:
            return
        for key in {m.ordering_key for m in messages if m.ordering_key}:
            try:
                self._publisher.resume_publish(self.topic_path, key)
            except Exception:  # stopped publisher / unseen key
                log.debug("resume_publish(%s) failed", key, exc_info=True)

    def forward_dead_letters(self, entries: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Publish dead-lettered messages to `<topic>-dead-letter` with the reason attached.

        The subscription's own dead-letter policy only fires when Pub/Sub counts too many
        deliveries; messages the pipeline gives up on earlier (undecodable, rejected after
        N attempts) are acked, so they are forwarded here to reach the same topic.
        """
        if not entries:
            return
        topic = f"{self.topic_path}{DEAD_LETTER_SUFFIX}"
        futures = []
        for message, reason in entries:
            attributes = {k: v for k, v in message.attributes.items() if not k.startswith("dead_letter_")}
            attributes["dead_letter_reason"] = reason.encode()[:1000].decode("utf-8", "ignore")
            attributes["dead_letter_source_message_id"] = message.message_id
            futures.append(self.publisher.publish(topic, bytes(message.data), retry=None, timeout=30.0, **attributes))
        for f in futures:
            f.result(timeout=30.0)

    # ------------------------------------------------------------------ subscribe
    def start_subscriber(self) -> None:
        """Open the streaming pull (idempotent; restarts it if it has stopped)."""
        from google.cloud import pubsub_v1

        with self._lock:
            if self._closed:
                raise BrokerUnavailable("pubsub broker is closed")
            if self._streaming is not None and not self._streaming.done():
                return
        subscriber = self.subscriber
        try:
            sub = subscriber.get_subscription(
                request={"subscription": self.subscription_path}, timeout=READY_TIMEOUT, retry=None
            )
            self._exactly_once = bool(getattr(sub, "enable_exactly_once_delivery", False))
        except Exception as exc:
            raise BrokerUnavailable(f"cannot open subscription {self.subscription_path}: {exc!r}") from exc
        max_messages = max(1, self.settings.pull_max_messages)
        ack_deadline = min(max(int(self.settings.ack_deadline_seconds), 10), MAX_MODACK_SECONDS)
        flow = pubsub_v1.types.FlowControl(
            max_messages=max_messages,
            max_bytes=max(max_messages * 2 * 1024 * 1024, 64 * 1024 * 1024),
            max_lease_duration=MAX_LEASE_SECONDS,
            # Lease extensions of ACK_DEADLINE_SECONDS: if this process dies, messages
            # come back after about that long.
            min_duration_per_lease_extension=ack_deadline,
            max_duration_per_lease_extension=ack_deadline,
        )
        future = subscriber.subscribe(self.subscription_path, callback=self._on_message, flow_control=flow)
        with self._lock:
            self._streaming = future

    def _on_message(self, message: Any) -> None:
        if self._closed:
            message.nack()
            return
        self._queue.put(message)

    def _check_stream(self) -> None:
        future = self._streaming
        if future is not None and future.done():
            exc = None if future.cancelled() else future.exception(timeout=0)
            with self._lock:
                if self._streaming is future:
                    self._streaming = None  # the next pull() reopens it
            raise BrokerUnavailable(f"pubsub streaming pull stopped: {exc!r}")

    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        """Take up to `max_messages` delivered messages, waiting up to `timeout` for the first.

        Ordering repair: after a nack of a message with key K, the library hands over K's
        next message at once, while Pub/Sub redelivers the nacked one (and its followers)
        later. Until the nacked message comes back (or a grace period ends), later K
        messages are nacked here so K's order is kept.
        """
        if self._streaming is None:
            self.start_subscriber()
        self._check_stream()
        out: list[ReceivedMessage] = []
        end = time.monotonic() + max(0.0, timeout)
        while len(out) < max_messages:
            try:
                if not out:
                    message = self._queue.get(timeout=max(0.0, end - time.monotonic()))
                else:
                    message = self._queue.get_nowait()
            except queue.Empty:
                if out or time.monotonic() >= end:
                    break
                continue
            if self._held_back(message):
                continue
            out.append(self._convert(message))
        if not out:
            self._check_stream()
        return out

    def _held_back(self, message: Any) -> bool:
        key = message.ordering_key
        if not key or key not in self._blocked:
            return False
        blocked_id, until = self._blocked[key]
        if message.message_id == blocked_id or time.monotonic() > until:
            del self._blocked[key]
            return False
        message.nack()
        return True

    @staticmethod
    def _convert(message: Any) -> ReceivedMessage:
        return ReceivedMessage(
            message_id=message.message_id,
            data=message.data,
            attributes=dict(message.attributes),
            ordering_key=message.ordering_key or "",
            delivery_attempt=message.delivery_attempt or 1,
            handle=message,
        )

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        if not self._exactly_once:
            for m in messages:
                m.handle.ack()
            return
        futures = [(m, m.handle.ack_with_response()) for m in messages]
        for m, f in futures:
            try:
                f.result(timeout=60)
            except Exception as exc:  # the message may come back; its dedup_id keeps it applied once
                log.warning("ack of %s not confirmed: %r", m.message_id, exc)

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Return messages for redelivery; with a delay they come back after about that long.

        A delayed nack sets the ack deadline to the delay (0..600 s) and takes the
        message out of the library's lease management, so its lease is not extended again.
        """
        delay = int(min(max(delay_seconds, 0.0), MAX_MODACK_SECONDS) + 0.5)
        grace = delay + 2 * max(self.settings.ack_deadline_seconds, 10.0) + 30.0
        for m in messages:
            message = m.handle
            if m.ordering_key and self.ordering:
                self._blocked.setdefault(m.ordering_key, (m.message_id, time.monotonic() + grace))
            if delay > 0:
                message.modify_ack_deadline(delay)
                message.drop()
            else:
                message.nack()

    # ------------------------------------------------------------------ both
    def ready(self) -> tuple[bool, str]:
        if self._closed:
            return False, "pubsub broker closed"
        try:
            self.publisher.get_topic(request={"topic": self.topic_path}, timeout=READY_TIMEOUT, retry=None)
        except Exception as exc:
            return False, f"pubsub topic {self.topic_path} unreachable: {type(exc).__name__}: {exc}"
        stream = self._streaming
        if stream is not None and stream.done():
            return False, "pubsub streaming pull stopped"
        return True, "ok"

    def backlog(self) -> None:
        """Not available cheaply: Pub/Sub's backlog is the Cloud Monitoring metric
        `pubsub.googleapis.com/subscription/num_undelivered_messages`."""
        return None

    def close(self) -> None:
        """Stop the streaming pull (nacking what nobody took yet) and flush/stop the publisher."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streaming, self._streaming = self._streaming, None
            publisher, subscriber = self._publisher, self._subscriber
        while True:  # handed to us but never pulled: give back now (new ones are nacked by _on_message)
            try:
                self._queue.get_nowait().nack()
            except queue.Empty:
                break
            except Exception:  # not lost: an un-nacked message comes back after its ack deadline
                log.debug("nack on close failed", exc_info=True)
        if streaming is not None:
            streaming.cancel()
            try:
                streaming.result(timeout=10)
            except Exception:
                pass
        if subscriber is not None:
            try:
                subscriber.close()
            except Exception:
                log.debug("subscriber close failed", exc_info=True)
        if publisher is not None:
            try:
                publisher.stop()  # sends what is still batched; publish() already awaited its futures
            except Exception:
                log.debug("publisher stop failed", exc_info=True)
            try:
                publisher.transport.close()
            except Exception:
                pass
