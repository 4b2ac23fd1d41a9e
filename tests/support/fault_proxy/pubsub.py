"""Pub/Sub subscriber semantics pstest does not have: ordering, leases, attempts, dead letters.

pstest hands out any available message, in map order, whatever its ordering key and
whatever is still outstanding, never sets `delivery_attempt` and never applies a
dead-letter policy. `OrderingGate` serves the Subscriber service's Pull, StreamingPull,
Acknowledge and ModifyAckDeadline itself, as Google documents them, and keeps the
messages leased from pstest meanwhile (re-extended to 600 s, acked upstream on ack):

- Ordering (https://cloud.google.com/pubsub/docs/ordering): messages of one ordering
  key are delivered in publish order; a pull may carry several messages of one key (in
  order). When a message is nacked or its lease expires, it and every later message of
  its key that is outstanding are redelivered, in order.
- Key affinity (same page): while messages of a key are outstanding to a StreamingPull
  subscriber (its `client_id`, kept across reconnects), later messages of that key go to
  that subscriber only. Google documents no such thing for unary Pull: with
  `key_affinity=False` later messages of a key go only to a Pull from another subscriber
  (connection) than the one holding earlier ones (the worst case a replica must survive);
  by default a Pull gets none of a key while any of it is outstanding.
- Exactly-once delivery (https://cloud.google.com/pubsub/docs/exactly-once-delivery), when
  the subscription has it: an ack or modack naming an ack id that expired or was
  superseded fails with INVALID_ARGUMENT and an ErrorInfo mapping it to
  `PERMANENT_FAILURE_INVALID_ACK_ID` (the others in the request take effect).
- Leases (https://cloud.google.com/pubsub/docs/lease-management): a message not acked
  within its ack deadline (the subscription's, the stream's, or the last
  ModifyAckDeadline) is redelivered; an ack that arrives after that is dropped, as
  Google may. `expire_leases_after` caps every lease, extensions included (a test knob
  for "the lease ran out while the subscriber was still retrying"; `expiring_leases`
  limits it to that many deliveries).
- Delivery attempts (https://cloud.google.com/pubsub/docs/handling-failures#track_delivery_attempts;
  `ReceivedMessage.delivery_attempt` in google/pubsub/v1/pubsub.proto: "1 + (number of
  NACKs) + (number of ack_deadline exceeds)"): counted per delivery; reported only when
  the subscription has a dead-letter policy, else 0.
- Dead-letter policy (https://cloud.google.com/pubsub/docs/handling-failures#dead_letter_topic):
  after `max_delivery_attempts` deliveries, the next redelivery goes to the
  dead-letter topic instead (published upstream with the
  `CloudPubSubDeadLetterSource*` attributes) and the message is acked; listed in
  `dead_lettered`.

- Retry policy (RetryPolicy in https://cloud.google.com/pubsub/docs/reference/rpc/google.pubsub.v1,
  https://cloud.google.com/pubsub/docs/handling-failures): pstest redelivers a nacked
  message at once. When the subscription has a retry policy, a message that is nacked or
  whose lease expires is not redelivered before an exponential backoff,
  `minimum_backoff * 2^(deliveries - 1)` capped at `maximum_backoff`; with ordering, its
  key's later messages wait behind it. Without a retry policy, redelivery is immediate
  (Google's default).
- Flow control (StreamingPull's `max_outstanding_messages`; "The service will stop
  delivering messages if this many messages or more have neither been acknowledged nor
  rejected", MaxOutstandingMessagesOption in Google's C++ client reference): a stream is
  sent nothing while that many of its deliveries are leased; a nacked one no longer counts,
  one given a longer deadline still does.

Messages with no ordering key are delivered as they come. Messages are sequenced by
pstest's message ids ("m<N>", increasing per publish). `clock` (default `time.monotonic`)
is the gate's time for leases and backoffs, so a test can move it on.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from tests.support.fault_proxy.storage_write import abort_like

SUBSCRIBER = "/google.pubsub.v1.Subscriber/"
UPSTREAM_LEASE_SECONDS = 600  # pstest keeps what the gate holds leased this long
REFRESH_SECONDS = 60.0
PULL_WAIT_SECONDS = 1.0


@dataclass
class _Message:
    message_id: str
    seq: tuple[int, str]
    key: str
    message: Any  # google.pubsub_v1.types.PubsubMessage
    upstream_ack_id: str
    deliveries: int = 0
    not_before: float = 0.0  # the retry policy's backoff: not redelivered before this


@dataclass
class _Lease:
    msg: _Message
    deadline: float
    cap: float | None  # expire_leases_after: no extension goes past this
    stream: int | None = None
    client: str | None = None  # who holds it: a StreamingPull client_id, or a unary Pull's peer


@dataclass
class _Subscription:
    name: str
    ack_deadline: float
    ordered: bool
    dead_letter_topic: str | None
    max_attempts: int
    exactly_once: bool = False
    min_backoff: float | None = None  # the retry policy's; None: immediate redelivery
    max_backoff: float = 600.0
    pending: dict[str, list[_Message]] = field(default_factory=dict)  # key -> waiting, in order
    leases: dict[str, _Lease] = field(default_factory=dict)  # our ack id -> lease
    held: dict[str, _Message] = field(default_factory=dict)  # message id -> message (pending or leased)


class OrderingGate:
    def __init__(self, *, expire_leases_after: float | None = None, expiring_leases: int | None = None,
                 key_affinity: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.expire_leases_after = expire_leases_after
        self.key_affinity = key_affinity  # for unary Pull (streams always have it, as documented)
        self.served_across = 0  # deliveries of a key while earlier ones were outstanding to another subscriber
        self.subscribers: set[str] = set()  # who pulled: stream client ids and unary Pull peers
        self.refused_acks = 0  # exactly-once: ack/modack of an expired or superseded ack id, answered with an error
        self.expiring_leases = expiring_leases  # how many deliveries get that cap (None: all)
        self.dead_lettered: list[str] = []  # message ids sent to the dead-letter topic
        self.late_acks = 0  # acks dropped because the lease had expired
        self.expired = 0  # leases that ran out (message redelivered)
        self.nacked = 0
        self.backoffs = 0  # messages given back and held for the retry policy's backoff
        self.deliveries = 0
        self.max_messages_per_key_per_pull = 0
        self.violations: list[str] = []  # a message acked while an earlier one of its key is unacked
        self._subs: dict[str, _Subscription] = {}
        self._lock = threading.RLock()
        self._delivering = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stream_ids = itertools.count(1)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ wiring
    def handlers(self, channel: grpc.Channel, metadata: Callable[[grpc.ServicerContext], list]) -> dict[str, grpc.RpcMethodHandler]:
        from google.pubsub_v1 import types as t

        self._channel = channel
        threading.Thread(target=self._refresh_loop, name="pubsub-gate-refresh", daemon=True).start()
        unary = grpc.unary_unary_rpc_method_handler
        return {
            SUBSCRIBER + "Pull": unary(self._guard(self._pull), t.PullRequest.deserialize, t.PullResponse.serialize),
            SUBSCRIBER + "Acknowledge": unary(
                self._guard(self._acknowledge), t.AcknowledgeRequest.deserialize, _empty_serialize
            ),
            SUBSCRIBER + "ModifyAckDeadline": unary(
                self._guard(self._modify_ack_deadline), t.ModifyAckDeadlineRequest.deserialize, _empty_serialize
            ),
            SUBSCRIBER + "StreamingPull": grpc.stream_stream_rpc_method_handler(
                self._streaming_pull, t.StreamingPullRequest.deserialize, t.StreamingPullResponse.serialize
            ),
        }

    def close(self) -> None:
        self._stop.set()

    @staticmethod
    def _guard(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(request, context)
            except grpc.RpcError as err:  # pstest said no (unknown subscription, gone)
                abort_like(context, err)

        return call

    def _upstream(self, method: str, request: Any, response_type: Any = None) -> Any:
        assert self._channel is not None
        call = self._channel.unary_unary(
            SUBSCRIBER + method if "/" not in method else method,
            request_serializer=type(request).serialize,
            response_deserializer=response_type.deserialize if response_type is not None else None,
        )
        return call(request, timeout=30)

    # ------------------------------------------------------------------ state
    def _subscription(self, name: str) -> _Subscription:
        from google.pubsub_v1 import types as t

        with self._lock:
            sub = self._subs.get(name)
        if sub is not None:
            return sub
        info = self._upstream("GetSubscription", t.GetSubscriptionRequest(subscription=name), t.Subscription)
        policy = info.dead_letter_policy
        sub = _Subscription(
            name=name, ack_deadline=float(info.ack_deadline_seconds or 10), ordered=bool(info.enable_message_ordering),
            dead_letter_topic=policy.dead_letter_topic or None, max_attempts=policy.max_delivery_attempts or 5,
            exactly_once=bool(info.enable_exactly_once_delivery),
        )  # fmt: skip
        if "retry_policy" in info:  # unset: Google redelivers at once
            retry = info.retry_policy
            # Google's defaults: 10 s and 600 s (RetryPolicy in google/pubsub/v1/pubsub.proto)
            sub.min_backoff = _seconds(retry.minimum_backoff, 10.0)
            sub.max_backoff = _seconds(retry.maximum_backoff, 600.0)
        with self._lock:
            return self._subs.setdefault(name, sub)

    def _refill(self, sub: _Subscription) -> None:
        """Take everything pstest has available, so order within a key is known before delivering."""
        from google.pubsub_v1 import types as t

        received: list[Any] = []
        while True:  # pstest hands out at most max_messages per pull, in map order: take all of them
            got = self._upstream("Pull", t.PullRequest(subscription=sub.name, max_messages=1000, return_immediately=True),
                                 t.PullResponse).received_messages  # fmt: skip
            received.extend(got)
            if len(got) < 1000:
                break
        fresh = []
        with self._lock:
            for rm in received:
                m = rm.message
                known = sub.held.get(m.message_id)
                if known is not None:  # pstest redelivered one we hold: keep its newest ack id
                    known.upstream_ack_id = rm.ack_id
                else:
                    msg = _Message(m.message_id, _sequence(m), m.ordering_key if sub.ordered else "", m, rm.ack_id)
                    sub.held[m.message_id] = msg
                    queue = sub.pending.setdefault(msg.key, [])
                    queue.append(msg)
                    queue.sort(key=lambda x: x.seq)
                fresh.append(rm.ack_id)
        if fresh:
            self._upstream("ModifyAckDeadline", t.ModifyAckDeadlineRequest(
                subscription=sub.name, ack_ids=fresh, ack_deadline_seconds=UPSTREAM_LEASE_SECONDS))  # fmt: skip

    def _expire(self, sub: _Subscription, now: float) -> None:
        for ack_id, lease in list(sub.leases.items()):
            if ack_id in sub.leases and now >= lease.deadline:
                self.expired += 1
                self._return(sub, lease.msg, now)

    def _return(self, sub: _Subscription, msg: _Message, now: float) -> None:
        """Give `msg` back, with every later outstanding message of its key (redelivered in
        order, after `msg`'s backoff)."""
        if sub.min_backoff is not None:
            backoff = sub.min_backoff * 2 ** max(msg.deliveries - 1, 0)
            msg.not_before = now + min(backoff, sub.max_backoff)
            self.backoffs += 1
        back = [
            (a, lease) for a, lease in sub.leases.items()
            if lease.msg is msg or (msg.key and lease.msg.key == msg.key and lease.msg.seq > msg.seq)
        ]  # fmt: skip
        queue = sub.pending.setdefault(msg.key, [])
        for ack_id, lease in back:
            del sub.leases[ack_id]
            queue.append(lease.msg)
        queue.sort(key=lambda x: x.seq)

    def _deliver(self, sub: _Subscription, limit: int, deadline_seconds: float, stream: int | None = None,
                 client: str | None = None) -> list[Any]:
        # One refill-and-deliver at a time: two concurrent refills could each take part of a
        # key's messages from pstest, and one could deliver a later message first.
        with self._delivering:
            return self._deliver_locked(sub, limit, deadline_seconds, stream, client)

    def _may_serve(self, holders: set[str | None], client: str | None, streaming: bool) -> bool:
        """May a key whose outstanding messages are held by `holders` go to `client`?"""
        if not holders:
            return True
        if streaming:  # affinity: only to the subscriber holding the key
            return holders == {client}
        # Unary Pull: by default nothing of a key while any is outstanding; without affinity,
        # the worst Google allows: only to another subscriber than the one holding the key.
        return not self.key_affinity and client not in holders

    def _deliver_locked(self, sub: _Subscription, limit: int, deadline_seconds: float, stream: int | None,
                        client: str | None) -> list[Any]:
        from google.pubsub_v1 import types as t

        self._refill(sub)
        now = self.clock()
        out: list[Any] = []
        dead: list[_Message] = []
        with self._lock:
            self._expire(sub, now)
            holders: dict[str, set[str | None]] = {}
            for lease in sub.leases.values():
                if lease.msg.key:
                    holders.setdefault(lease.msg.key, set()).add(lease.client)
            for key in list(sub.pending):
                if key and not self._may_serve(holders.get(key, set()), client, stream is not None):
                    continue
                if key and holders.get(key, set()) - {client}:
                    self.served_across += 1
                queue = sub.pending[key]
                taken = 0
                i = 0
                while i < len(queue) and len(out) < limit:
                    msg = queue[i]
                    if msg.not_before > now:  # backing off
                        if key:
                            break  # ordering: the key's later messages wait behind it
                        i += 1
                        continue
                    queue.pop(i)
                    if sub.dead_letter_topic and msg.deliveries >= sub.max_attempts:
                        dead.append(msg)
                        del sub.held[msg.message_id]
                        continue
                    msg.deliveries += 1
                    ack_id = f"{msg.message_id}.{msg.deliveries}.{uuid.uuid4().hex[:8]}"
                    cap = self._lease_cap(now)
                    lease = _Lease(msg, _capped(now + deadline_seconds, cap), cap, stream, client)
                    sub.leases[ack_id] = lease
                    out.append(t.ReceivedMessage(
                        ack_id=ack_id, message=msg.message, delivery_attempt=msg.deliveries if sub.dead_letter_topic else 0))  # fmt: skip
                    taken += 1
                if not queue:
                    del sub.pending[key]
                if key:
                    self.max_messages_per_key_per_pull = max(self.max_messages_per_key_per_pull, taken)
                if len(out) >= limit:
                    break
            self.deliveries += len(out)
        for msg in dead:
            self._dead_letter(sub, msg)
        return out

    def _lease_cap(self, now: float) -> float | None:
        if self.expire_leases_after is None or self.expiring_leases == 0:
            return None
        if self.expiring_leases is not None:
            self.expiring_leases -= 1
        return now + self.expire_leases_after

    def _dead_letter(self, sub: _Subscription, msg: _Message) -> None:
        from google.pubsub_v1 import types as t

        attributes = dict(msg.message.attributes)
        attributes.update(
            CloudPubSubDeadLetterSourceDeliveryCount=str(msg.deliveries),
            CloudPubSubDeadLetterSourceSubscription=sub.name.rsplit("/", 1)[-1],
            CloudPubSubDeadLetterSourceSubscriptionProject=sub.name.split("/")[1],
        )
        request = t.PublishRequest(topic=sub.dead_letter_topic, messages=[t.PubsubMessage(data=msg.message.data, attributes=attributes)])
        self._upstream("/google.pubsub.v1.Publisher/Publish", request, t.PublishResponse)
        self._upstream("Acknowledge", t.AcknowledgeRequest(subscription=sub.name, ack_ids=[msg.upstream_ack_id]))
        with self._lock:
            self.dead_lettered.append(msg.message_id)

    def _ack(self, sub: _Subscription, ack_ids: list[str]) -> list[str]:
        """Ack what is leased; return the ack ids exactly-once delivery refuses."""
        from google.pubsub_v1 import types as t

        now = self.clock()
        done: list[str] = []
        acked: list[_Message] = []
        refused: list[str] = []
        with self._lock:
            self._expire(sub, now)
            for ack_id in ack_ids:
                lease = sub.leases.pop(ack_id, None)
                if lease is None:
                    self.late_acks += 1  # expired (and maybe redelivered): Google may drop it too
                    if sub.exactly_once:
                        refused.append(ack_id)
                    continue
                sub.held.pop(lease.msg.message_id, None)
                done.append(lease.msg.upstream_ack_id)
                acked.append(lease.msg)
            for msg in acked:  # acked while an earlier message of its key is still unacked?
                earlier = [m.message_id for m in sub.held.values() if msg.key and m.key == msg.key and m.seq < msg.seq]
                if earlier:
                    self.violations.append(f"{msg.message_id} (key {msg.key}) acked before {earlier}")
        if done:
            self._upstream("Acknowledge", t.AcknowledgeRequest(subscription=sub.name, ack_ids=done))
        return refused

    def _modack(self, sub: _Subscription, ack_ids: list[str], seconds: float) -> list[str]:
        """Modify what is leased; return the ack ids exactly-once delivery refuses."""
        now = self.clock()
        refused: list[str] = []
        with self._lock:
            self._expire(sub, now)
            for ack_id in ack_ids:
                lease = sub.leases.get(ack_id)
                if lease is None:
                    if sub.exactly_once:
                        refused.append(ack_id)
                    continue
                if seconds <= 0:
                    self.nacked += 1
                    self._return(sub, lease.msg, now)
                else:
                    lease.deadline = _capped(now + seconds, lease.cap)
        return refused

    def _refresh_loop(self) -> None:
        from google.pubsub_v1 import types as t

        while not self._stop.wait(REFRESH_SECONDS):
            with self._lock:
                work = [(s.name, [m.upstream_ack_id for m in s.held.values()]) for s in self._subs.values()]
            for name, ack_ids in work:
                if ack_ids:
                    try:
                        self._upstream("ModifyAckDeadline", t.ModifyAckDeadlineRequest(
                            subscription=name, ack_ids=ack_ids, ack_deadline_seconds=UPSTREAM_LEASE_SECONDS))  # fmt: skip
                    except grpc.RpcError:
                        pass  # pstest gone (a test stopping it): nothing to keep

    # ------------------------------------------------------------------ the RPCs
    def _pull(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.pubsub_v1 import types as t

        sub = self._subscription(request.subscription)
        limit = request.max_messages or 1000
        end = time.monotonic() + min(PULL_WAIT_SECONDS, context.time_remaining() or PULL_WAIT_SECONDS)
        while True:
            client = f"peer:{context.peer()}"
            with self._lock:
                self.subscribers.add(client)
            got = self._deliver(sub, limit, sub.ack_deadline, client=client)
            if got or request.return_immediately or time.monotonic() >= end or not context.is_active():
                return t.PullResponse(received_messages=got)
            time.sleep(0.05)

    def _acknowledge(self, request: Any, context: grpc.ServicerContext) -> None:
        self._refuse(context, self._ack(self._subscription(request.subscription), list(request.ack_ids)))

    def _modify_ack_deadline(self, request: Any, context: grpc.ServicerContext) -> None:
        sub = self._subscription(request.subscription)
        self._refuse(context, self._modack(sub, list(request.ack_ids), request.ack_deadline_seconds))

    def _refuse(self, context: grpc.ServicerContext, ack_ids: list[str]) -> None:
        if ack_ids:
            with self._lock:
                self.refused_acks += len(ack_ids)
            context.abort_with_status(invalid_ack_ids_status(ack_ids))

    def _streaming_pull(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        from google.pubsub_v1 import types as t

        first = next(requests)
        try:
            sub = self._subscription(first.subscription)
        except grpc.RpcError as err:
            abort_like(context, err)
            return
        stream = next(self._stream_ids)
        client = first.client_id or f"stream-{stream}"  # a stream without client_id is its own subscriber
        with self._lock:
            self.subscribers.add(client)
        deadline = float(first.stream_ack_deadline_seconds or sub.ack_deadline)
        max_outstanding = first.max_outstanding_messages or 1000
        ended = threading.Event()

        def settle(req: Any) -> None:
            if req.ack_ids:
                self._ack(sub, list(req.ack_ids))
            by_seconds: dict[int, list[str]] = {}
            for ack_id, seconds in zip(req.modify_deadline_ack_ids, req.modify_deadline_seconds):
                by_seconds.setdefault(seconds, []).append(ack_id)
            for seconds, ids in by_seconds.items():
                self._modack(sub, ids, seconds)

        def read() -> None:
            try:
                settle(first)
                for req in requests:
                    settle(req)
            except Exception:  # the client went away
                pass
            finally:
                ended.set()

        threading.Thread(target=read, name="pubsub-gate-stream", daemon=True).start()
        properties = t.StreamingPullResponse.SubscriptionProperties(message_ordering_enabled=sub.ordered)
        while context.is_active() and not ended.is_set():
            with self._lock:
                mine = sum(1 for lease in sub.leases.values() if lease.stream == stream)
            room = max_outstanding - mine
            got = self._deliver(sub, room, deadline, stream, client) if room > 0 else []
            if got:
                yield t.StreamingPullResponse(received_messages=got, subscription_properties=properties)
            else:
                time.sleep(0.05)


def invalid_ack_ids_status(ack_ids: list[str]) -> Any:
    """Pub/Sub's answer, with exactly-once delivery, to an ack/modack naming invalid ack ids."""
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    info = error_details_pb2.ErrorInfo(
        reason="EXACTLY_ONCE_ACKID_FAILURE", domain="pubsub.googleapis.com",
        metadata={a: "PERMANENT_FAILURE_INVALID_ACK_ID" for a in ack_ids},
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="Some acknowledgement ids in the request were invalid. This could be because the acknowledgement "
        "ids have expired or the acknowledgement ids were malformed.",
    )
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


def _sequence(message: Any) -> tuple[int, str]:
    mid = message.message_id
    digits = mid.lstrip("m")
    return (int(digits) if digits.isdigit() else 0, mid)


def _seconds(duration: Any, default: float) -> float:
    """A protobuf Duration as proto-plus hands it out (a timedelta); unset: `default`."""
    seconds = duration.total_seconds() if duration is not None else 0.0
    return float(seconds) if seconds > 0 else default


def _capped(deadline: float, cap: float | None) -> float:
    return deadline if cap is None else min(deadline, cap)


def _empty_serialize(_: Any) -> bytes:
    return b""  # google.protobuf.Empty
