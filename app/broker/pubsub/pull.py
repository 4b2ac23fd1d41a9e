"""Subscriber side of the Pub/Sub broker: a StreamingPull stream, a per-key gate and a lease keeper.

Why a stream (StreamingPull) and not unary Pull: per-table order across replicas. Google
documents key affinity for streaming pull only: while messages of an ordering key are
outstanding to a streaming-pull subscriber, further messages of that key go to the same
subscriber (https://cloud.google.com/pubsub/docs/ordering, "Subscriber affinity" and
https://cloud.google.com/pubsub/docs/pull#streamingpull_api). For unary Pull nothing says
a later message of a key is not handed to another replica's Pull while an earlier one is
outstanding there, so two replicas could apply one table's messages out of order. The
stream's `client_id` stays the same across reconnects so the server carries the stream's
state (its keys) over to the new one (StreamingPullRequest.client_id in
google/pubsub/v1/pubsub.proto).

Why not the client library's streaming-pull callback API: with ordering it hands the
callback one message per ordering key at a time, so a one-table backlog would be applied
one message per warehouse round trip. We read the stream ourselves: a response carries a
key's messages in order, so a backlog comes out as runs of up to `PULL_MAX_MESSAGES`.

Threads:
- the puller reads the stream (flow control: `max_outstanding_messages` = `held_limit`,
  and `HELD_MAX_BYTES`), moves each delivery to our own ack deadline at once (the
  receipt modack: with exactly-once delivery it also tells whether the delivery is still
  valid; one that is not is dropped) and queues it in the `KeyGate`;
- the lease keeper extends the ack deadline of everything held (queued or with the
  pipeline) every third of `ACK_DEADLINE_SECONDS`, until a message has been held for
  `PUBSUB_MAX_LEASE_SECONDS` counted from its delivery; then it is left to expire and
  Pub/Sub redelivers it (and, with ordering, every later message of its key). It also
  sends the stream's heartbeat. If this process dies, its messages come back after about
  `ACK_DEADLINE_SECONDS`.

Every ack and modack result is checked (`settle`): a failed ack is logged and counted (the
message comes back; the warehouse's dedup id keeps it applied once); a failed lease
extension means the lease is lost: the message is dropped if still queued, or marked
`lease_lost` for the pipeline, which hands it back instead of applying it. An apply
already running cannot be stopped from here; fencing it is the warehouse's job.

`pull()` hands out queued messages of keys the pipeline holds none of. `nack()` hands
messages back at once (ModifyAckDeadline 0), whatever delay the pipeline asked for: a
message given back with a longer deadline stays outstanding to this stream and counts
against its flow control ("The service will stop delivering messages if this many
messages or more have neither been acknowledged nor rejected": MaxOutstandingMessagesOption
in https://cloud.google.com/cpp/docs/reference/pubsub/latest/structgoogle_1_1cloud_1_1pubsub_1_1MaxOutstandingMessagesOption;
https://cloud.google.com/pubsub/docs/flow-control), so one waiting table's backlog would
stop every other table. The subscription's retry policy spaces the redeliveries instead
(exponential backoff between RETRY_MIN/MAX_BACKOFF_SECONDS, "triggered on NACKs or
acknowledgment deadline exceeded events": RetryPolicy in
https://cloud.google.com/pubsub/docs/reference/rpc/google.pubsub.v1 and
https://cloud.google.com/pubsub/docs/handling-failures). A nack also gives back the
queued messages of the same key, since Pub/Sub redelivers them after the nacked one
anyway (https://cloud.google.com/pubsub/docs/ordering).

Order: a later message of a handed-back key may already be on its way to this stream
(sent before the nack reached Pub/Sub). Handed out, it would be applied and acked before
the handed-back one comes again. So the key is *deferred* until a handed-back message of
it is redelivered: a later message that arrives meanwhile is handed back at once too and
never reaches the pipeline; Pub/Sub redelivers the key from its earliest unacked message,
in order. A deferral is forgotten after the longest retry backoff (600 s) and an ack
deadline, in case the redelivery went to another replica.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from app.broker.base import BrokerUnavailable, ReceivedMessage
from app.broker.pubsub.ordering import KeyGate, Lease
from app.broker.pubsub.settle import CallFailed, settle
from app.settings import Settings

log = logging.getLogger(__name__)

# ModifyAckDeadline accepts 0..600 s; Pub/Sub subscriptions need at least 10 s.
MIN_ACK_DEADLINE = 10
MAX_ACK_DEADLINE = 600
ACK_IDS_PER_REQUEST = 1000  # the client library's own batch size for ack/modack requests
SETTLE_TIMEOUT = 60.0  # ack / modack RPCs (the library retries transient errors within it)
STREAM_TIMEOUT = 900.0  # a stream is reopened after this long at the latest
STREAM_HEALTHY_SECONDS = 2.0  # a stream open this long without failing clears the last error
HELD_MAX_BYTES = 256 * 1024 * 1024  # pulled and not yet acked, across all keys
PULL_MAX_BYTES = 64 * 1024 * 1024  # handed out by one pull() (always at least one message)
ERROR_BACKOFF_MAX = 5.0
MAX_RETRY_BACKOFF = 600  # RetryPolicy.maximum_backoff's upper bound: a nacked message is back by then


@dataclass(slots=True)
class _Deferral:
    """A key's messages handed back: until one of them is delivered again (or `since` is
    long past), later messages of the key are handed back as well."""

    since: float
    ids: set[str] = field(default_factory=set)


def ack_deadline(settings: Settings) -> int:
    return int(min(max(round(settings.ack_deadline_seconds), MIN_ACK_DEADLINE), MAX_ACK_DEADLINE))


def _chunks(items: list[str], size: int = ACK_IDS_PER_REQUEST):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Requests:
    """The client side of one stream: the opening request, then heartbeats, until closed."""

    def __init__(self, first: Any) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._queue.put(first)

    def __iter__(self) -> Iterator[Any]:
        while (request := self._queue.get()) is not None:
            yield request

    def send(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)


class Puller:
    """Pulled messages of one subscription, from delivery until ack/nack."""

    def __init__(self, settings: Settings, subscription_path: str, client: Callable[[], Any]) -> None:
        self.subscription_path = subscription_path
        self._client = client
        self.ack_deadline = ack_deadline(settings)
        self.max_lease = float(settings.pubsub_max_lease_seconds)
        self.held_limit = max(2 * settings.pull_max_messages, 1)
        self.client_id = uuid.uuid4().hex  # one per process: the server's key affinity follows it
        self._cond = threading.Condition()
        self._gate = KeyGate()
        self._out: dict[int, Lease] = {}  # id(lease) -> lease handed to the pipeline
        self._deferred: dict[str, _Deferral] = {}  # ordering key -> its messages handed back
        self._error: BaseException | None = None  # of the last stream, None after a good one
        self._stream_since: float | None = None  # when the current stream was opened
        self._requests: _Requests | None = None
        self._stream: Any = None
        self._closed = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise BrokerUnavailable("pubsub broker is closed")
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._pull_loop, name="pubsub-puller", daemon=True),
                threading.Thread(target=self._keeper_loop, name="pubsub-lease-keeper", daemon=True),
            ]
        for t in self._threads:
            t.start()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    @property
    def error(self) -> BaseException | None:
        with self._cond:
            return self._current_error()

    def _current_error(self) -> BaseException | None:
        since = self._stream_since
        if self._error is not None and since is not None and time.monotonic() - since >= STREAM_HEALTHY_SECONDS:
            self._error = None  # the stream reopened and has held since
        return self._error

    def close(self) -> None:
        """Stop pulling; give back what the pipeline never took (best effort: it comes back
        after its ack deadline anyway). Messages still with the pipeline just expire."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting = self._gate.pop_all()
            requests, stream = self._requests, self._stream
            self._cond.notify_all()
        if requests is not None:
            requests.close()
        if stream is not None:
            try:
                stream.cancel()
            except Exception:
                log.debug("cancelling the stream failed", exc_info=True)
        if waiting and self._threads:
            self._modack_quietly([lease.ack_id for lease in waiting], 0, "nack")

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    # ------------------------------------------------------------------ pipeline side
    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        self.start()
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._closed:
                    raise BrokerUnavailable("pubsub broker is closed")
                leases = self._gate.take(max(1, max_messages), PULL_MAX_BYTES)
                if leases:
                    for lease in leases:
                        self._out[id(lease)] = lease
                    self._cond.notify_all()  # room for the puller, if it waited
                    return [lease.message for lease in leases]
                error = self._current_error()
                if error is not None:
                    raise BrokerUnavailable(f"pubsub pull from {self.subscription_path} failed: {error!r}")
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(min(remaining, STREAM_HEALTHY_SECONDS))

    def intake_full(self) -> bool:
        """The stream is left unread (our hold is full, as is the server's window for this
        stream) and nothing queued can be handed out: every queued message is of a key the
        pipeline holds. Only the pipeline can free that window, by settling those keys."""
        with self._cond:
            full = self._held() >= self.held_limit or self._gate.waiting_bytes >= HELD_MAX_BYTES
            return not self._closed and full and not self._gate.has_ready()

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        ack_ids: list[str] = []
        with self._cond:
            for m in messages:
                lease = self._take_back(m)
                ack_ids.append(lease.ack_id)
                # A redelivery of it that arrived meanwhile is done too.
                ack_ids.extend(c.ack_id for c in self._gate.pop_copies(m.message_id, m.ordering_key))
            self._cond.notify_all()
        try:
            failed = settle("ack", self._acknowledge, ack_ids)
        except CallFailed as exc:  # the messages come back; their dedup_id keeps them applied once
            raise BrokerUnavailable(f"pubsub ack of {len(ack_ids)} message(s) failed: {exc}") from exc
        if failed:
            # Not settled: Pub/Sub delivers them again and the warehouse drops the copies.
            log.warning("pubsub refused %d of %d ack(s); those messages will be redelivered: %s",
                        len(failed), len(ack_ids), sorted(set(failed.values())))

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Hand back at once; `delay_seconds` is left to the subscription's retry policy
        (see the module docstring: a longer deadline would hold flow control)."""
        ack_ids: list[str] = []
        with self._cond:
            by_key: dict[str, list[str]] = {}
            for m in messages:
                ack_ids.append(self._take_back(m).ack_id)
                if m.ordering_key:
                    by_key.setdefault(m.ordering_key, []).append(m.message_id)
            for key, message_ids in by_key.items():
                waiting = self._gate.pop_key(key)
                ack_ids.extend(lease.ack_id for lease in waiting)
                self._defer(key, message_ids + [lease.message.message_id for lease in waiting])
            self._cond.notify_all()
        try:
            # A refused nack is harmless: that delivery is no longer ours, it comes back anyway.
            settle("nack", lambda ids: self._modack(ids, 0), ack_ids)
        except CallFailed as exc:  # they come back once their current deadline passes
            raise BrokerUnavailable(f"pubsub nack of {len(ack_ids)} message(s) failed: {exc}") from exc

    def _defer(self, key: str, message_ids: list[str]) -> None:
        deferral = self._deferred.setdefault(key, _Deferral(0.0))
        deferral.since = time.monotonic()
        deferral.ids.update(message_ids)

    def _split_deferred(self, leases: list[Lease], now: float) -> tuple[list[Lease], list[Lease]]:
        """(to queue, to hand back): a deferred key's later messages go back, in arrival
        order, until a message handed back earlier arrives again (Pub/Sub redelivers the
        key from there, in order)."""
        forget_after = MAX_RETRY_BACKOFF + self.ack_deadline
        for key in [k for k, d in self._deferred.items() if now >= d.since + forget_after]:
            del self._deferred[key]
        keep: list[Lease] = []
        back: list[Lease] = []
        for lease in leases:
            key = lease.message.ordering_key
            deferral = self._deferred.get(key) if key else None
            if deferral is not None and lease.message.message_id in deferral.ids:
                del self._deferred[key]
            elif deferral is not None:
                back.append(lease)
                continue
            keep.append(lease)
        return keep, back

    def _take_back(self, message: ReceivedMessage) -> Lease:
        lease: Lease = message.handle
        if self._out.pop(id(lease), None) is not None:
            self._gate.release(lease)
        return lease

    # ------------------------------------------------------------------ threads
    def _held(self) -> int:
        return self._gate.waiting_count + len(self._out)

    def _opening_request(self) -> Any:
        from google.pubsub_v1 import types

        return types.StreamingPullRequest(
            subscription=self.subscription_path,
            stream_ack_deadline_seconds=self.ack_deadline,
            client_id=self.client_id,
            max_outstanding_messages=self.held_limit,
            max_outstanding_bytes=HELD_MAX_BYTES,
        )

    def _pull_loop(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                if self._closed:
                    return
                requests = self._requests = _Requests(self._opening_request())
                self._stream_since = time.monotonic()
            try:
                self._read_stream(requests)
                backoff = 0.1  # ended by the server (it closes streams now and then): reopen
            except Exception as exc:
                with self._cond:
                    if self._closed:
                        return
                    self._error, self._stream_since = exc, None
                    self._cond.notify_all()
                log.warning("pubsub stream from %s failed (reopening in %.1fs): %r", self.subscription_path, backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
            finally:
                requests.close()

    def _read_stream(self, requests: _Requests) -> None:
        stream = self._client().streaming_pull(requests=iter(requests), timeout=STREAM_TIMEOUT, retry=None)
        with self._cond:
            self._stream = stream
            if self._closed:
                stream.cancel()
                return
        responses = iter(stream)
        while True:
            with self._cond:  # full: leave the next response unread (the server's flow control does the same)
                while not self._closed and (
                    self._held() >= self.held_limit or self._gate.waiting_bytes >= HELD_MAX_BYTES
                ):
                    self._cond.wait(1.0)
                if self._closed:
                    return
            response = next(responses, None)
            if response is None:
                return  # the server ended the stream
            with self._cond:
                self._error = None
            self._receive(response.received_messages, time.monotonic())

    def _receive(self, received: Sequence[Any], now: float) -> None:
        # Google delivers a key's messages in publish order
        # (https://cloud.google.com/pubsub/docs/ordering); pstest returns one response's
        # messages in any order. A stable sort by publish time is a no-op on Google.
        leases = [self._lease(r, now) for r in sorted(received, key=_publish_time)]
        with self._cond:
            leases, deferred = self._split_deferred(leases, now)
        # Behind a handed-back message of their key: back at once, so that they neither
        # hold flow control nor overtake it (Pub/Sub redelivers the key in order).
        self._modack_quietly([lease.ack_id for lease in deferred], 0, "defer")
        if not leases:
            return
        # From the stream's ack deadline to ours, before anything else; with exactly-once
        # delivery a refused receipt modack means this delivery is already invalid.
        lost = self._modack_quietly([lease.ack_id for lease in leases], self.ack_deadline, "receipt")
        with self._cond:
            if self._closed:
                closed = True
            else:
                closed = False
                for lease in leases:
                    if lease.ack_id in lost:
                        log.warning("delivery of %s refused by Pub/Sub (%s); dropped",
                                    lease.message.message_id, lost[lease.ack_id])
                    else:
                        self._gate.add(lease)
                self._cond.notify_all()
        if closed:  # closed while pulling: give them back
            self._modack_quietly([lease.ack_id for lease in leases], 0, "nack")

    def _keeper_loop(self) -> None:
        interval = max(1.0, self.ack_deadline / 3)
        while True:
            due = time.monotonic() + interval
            with self._cond:  # woken by every pull/ack too: wait out the interval regardless
                while not self._closed and (remaining := due - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                if self._closed:
                    return
                requests = self._requests
            if requests is not None:  # the stream's heartbeat
                from google.pubsub_v1 import types

                requests.send(types.StreamingPullRequest(stream_ack_deadline_seconds=self.ack_deadline))
            try:
                self.extend_leases()
            except Exception as exc:
                log.warning("pubsub lease extension failed: %r", exc)

    def extend_leases(self) -> None:
        """Extend every held message's ack deadline, except those held past the max lease;
        a refused extension means the lease is lost."""
        now = time.monotonic()
        extend: dict[str, Lease] = {}
        with self._cond:
            for lease in self._gate.waiting():
                if now - lease.received_at >= self.max_lease:
                    self._gate.drop(lease)  # Pub/Sub redelivers it (and its key's later ones)
                    log.warning("message %s waited past the max lease; left to Pub/Sub", lease.message.message_id)
                else:
                    extend[lease.ack_id] = lease
            for lease in self._out.values():
                if not lease.extending:
                    continue
                if now - lease.received_at >= self.max_lease:
                    lease.extending = False  # its key stays busy here until the pipeline settles it
                    log.warning(
                        "message %s held past PUBSUB_MAX_LEASE_SECONDS=%.0f; Pub/Sub will redeliver it",
                        lease.message.message_id, self.max_lease,
                    )
                else:
                    extend[lease.ack_id] = lease
            if self._closed:
                return
        lost = self._modack_quietly(list(extend), self.ack_deadline, "lease")
        if lost:
            self._lose([extend[a] for a in lost if a in extend], lost)

    def _lose(self, leases: list[Lease], why: dict[str, str]) -> None:
        """Stop holding what Pub/Sub no longer leases to us: drop it if queued, tell the
        pipeline if it has it (its key stays busy here until the pipeline settles it)."""
        with self._cond:
            for lease in leases:
                lease.extending = False
                lease.message.lease_lost = True
                self._gate.drop(lease)
                log.warning("lease of message %s lost (%s); another delivery of it may be applied elsewhere",
                            lease.message.message_id, why.get(lease.ack_id))
            self._cond.notify_all()

    def _modack_quietly(self, ack_ids: list[str], seconds: int, op: str) -> dict[str, str]:
        """{ack id: reason} Pub/Sub refused; a failed call refuses them all."""
        if not ack_ids:
            return {}
        try:
            return settle(op, lambda ids: self._modack(ids, seconds), ack_ids)
        except CallFailed as exc:
            log.warning("pubsub %s of %d message(s) failed: %s", op, len(ack_ids), exc)
            return {}  # not known to be lost: the next extension tries again

    def _acknowledge(self, ack_ids: list[str]) -> None:
        for chunk in _chunks(ack_ids):
            self._client().acknowledge(
                request={"subscription": self.subscription_path, "ack_ids": chunk}, timeout=SETTLE_TIMEOUT
            )

    def _modack(self, ack_ids: list[str], seconds: int) -> None:
        for chunk in _chunks(ack_ids):
            self._client().modify_ack_deadline(
                request={"subscription": self.subscription_path, "ack_ids": chunk, "ack_deadline_seconds": seconds},
                timeout=SETTLE_TIMEOUT,
            )

    @staticmethod
    def _lease(received: Any, now: float) -> Lease:
        m = received.message
        message = ReceivedMessage(
            message_id=m.message_id,
            data=m.data,
            attributes=dict(m.attributes),
            ordering_key=m.ordering_key or "",
            # 0 without a dead-letter policy: best effort, never below 1 here.
            delivery_attempt=received.delivery_attempt or 1,
            received_at=now,
            # "populated by the server when it receives the Publish call":
            # https://cloud.google.com/python/docs/reference/pubsub/latest/google.cloud.pubsub_v1.types.PubsubMessage
            published_at=_publish_time(received)[0] or None,
        )
        lease = Lease(received.ack_id, message, now, nbytes=len(m.data))
        message.handle = lease
        return lease


def _publish_time(received: Any) -> Any:
    published = getattr(received.message, "publish_time", None)  # test fakes may lack it
    return (published.timestamp(), getattr(published, "nanosecond", 0)) if published else (0.0, 0)
