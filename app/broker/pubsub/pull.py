"""Subscriber side of the Pub/Sub broker: unary Pull, a per-key gate and a lease keeper.

Why not the streaming-pull client: with ordering it hands the callback one message per
ordering key at a time (the next only after ack/nack), so a one-table backlog is applied
one message per warehouse round trip. Synchronous Pull returns a key's messages in order
in one response, and Pub/Sub delivers no later messages of that key while earlier ones
are outstanding (https://cloud.google.com/pubsub/docs/ordering; synchronous pull:
https://cloud.google.com/pubsub/docs/pull#synchronous_pull). So a table's backlog comes
out as runs of up to `PULL_MAX_MESSAGES` in order.

Threads:
- the puller keeps up to `held_limit` messages (and `HELD_MAX_BYTES`) on hand: it pulls
  when there is room, moves each new delivery to our own ack deadline at once and queues
  it in the `KeyGate`;
- the lease keeper extends the ack deadline of everything held (queued or with the
  pipeline) every third of `ACK_DEADLINE_SECONDS`, until a message has been held for
  `PUBSUB_MAX_LEASE_SECONDS`; then it is left to expire and Pub/Sub redelivers it (and,
  with ordering, every later message of its key). If this process dies, its messages
  come back after about `ACK_DEADLINE_SECONDS`.

`pull()` hands out queued messages of keys the pipeline holds none of. `nack(delay)` sets
the ack deadline to the delay: Pub/Sub has no per-message nack delay, a message whose
deadline passes is redelivered (https://cloud.google.com/pubsub/docs/lease-management
and ModifyAckDeadline in https://cloud.google.com/pubsub/docs/reference/rpc/google.pubsub.v1).
A nack also gives back the queued messages of the same key, since Pub/Sub redelivers
them after the nacked one anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from app.broker.base import BrokerUnavailable, ReceivedMessage
from app.broker.pubsub.ordering import KeyGate, Lease
from app.settings import Settings

log = logging.getLogger(__name__)

# ModifyAckDeadline accepts 0..600 s; Pub/Sub subscriptions need at least 10 s.
MIN_ACK_DEADLINE = 10
MAX_ACK_DEADLINE = 600
PULL_MAX_PER_REQUEST = 1000  # what one Pull returns at most
ACK_IDS_PER_REQUEST = 1000  # the client library's own batch size for ack/modack requests
PULL_RPC_TIMEOUT = 10.0  # a long poll; the server answers as soon as messages are there
SETTLE_TIMEOUT = 60.0  # ack / modack RPCs (the library retries transient errors within it)
HELD_MAX_BYTES = 256 * 1024 * 1024  # pulled and not yet acked, across all keys
PULL_MAX_BYTES = 64 * 1024 * 1024  # handed out by one pull() (always at least one message)
ERROR_BACKOFF_MAX = 5.0


def ack_deadline(settings: Settings) -> int:
    return int(min(max(round(settings.ack_deadline_seconds), MIN_ACK_DEADLINE), MAX_ACK_DEADLINE))


def _chunks(items: list[str], size: int = ACK_IDS_PER_REQUEST):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Puller:
    """Pulled messages of one subscription, from delivery until ack/nack."""

    def __init__(self, settings: Settings, subscription_path: str, client: Callable[[], Any]) -> None:
        self.subscription_path = subscription_path
        self._client = client
        self.ack_deadline = ack_deadline(settings)
        self.max_lease = float(settings.pubsub_max_lease_seconds)
        self.held_limit = max(2 * settings.pull_max_messages, 1)
        self._cond = threading.Condition()
        self._gate = KeyGate()
        self._out: dict[int, Lease] = {}  # id(lease) -> lease handed to the pipeline
        self._error: BaseException | None = None  # of the last Pull, None after a good one
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
        return self._error

    def close(self) -> None:
        """Stop pulling; give back what the pipeline never took (best effort: it comes back
        after its ack deadline anyway). Messages still with the pipeline just expire."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting = self._gate.pop_all()
            self._cond.notify_all()
        if waiting and self._threads:
            try:
                self._modack([lease.ack_id for lease in waiting], 0)
            except Exception:
                log.debug("nack of %d unclaimed messages on close failed", len(waiting), exc_info=True)

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
                if self._error is not None:
                    raise BrokerUnavailable(f"pubsub pull from {self.subscription_path} failed: {self._error!r}")
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

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
            for chunk in _chunks(ack_ids):
                self._client().acknowledge(
                    request={"subscription": self.subscription_path, "ack_ids": chunk}, timeout=SETTLE_TIMEOUT
                )
        except Exception as exc:  # the messages come back; their dedup_id keeps them applied once
            raise BrokerUnavailable(f"pubsub ack of {len(ack_ids)} message(s) failed: {exc!r}") from exc

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float) -> None:
        delay = int(min(max(delay_seconds, 0.0), MAX_ACK_DEADLINE) + 0.5)
        ack_ids: list[str] = []
        with self._cond:
            keys = set()
            for m in messages:
                ack_ids.append(self._take_back(m).ack_id)
                if m.ordering_key:
                    keys.add(m.ordering_key)
            for key in keys:
                ack_ids.extend(lease.ack_id for lease in self._gate.pop_key(key))
            self._cond.notify_all()
        try:
            self._modack(ack_ids, delay)
        except Exception as exc:  # they come back once their current deadline passes
            raise BrokerUnavailable(f"pubsub nack of {len(ack_ids)} message(s) failed: {exc!r}") from exc

    def _take_back(self, message: ReceivedMessage) -> Lease:
        lease: Lease = message.handle
        if self._out.pop(id(lease), None) is not None:
            self._gate.release(lease)
        return lease

    # ------------------------------------------------------------------ threads
    def _held(self) -> int:
        return self._gate.waiting_count + len(self._out)

    def _pull_loop(self) -> None:
        from google.api_core import exceptions as gexc

        backoff = 0.1
        while True:
            with self._cond:
                while not self._closed and (
                    self._held() >= self.held_limit or self._gate.waiting_bytes >= HELD_MAX_BYTES
                ):
                    self._cond.wait(1.0)
                if self._closed:
                    return
                room = min(self.held_limit - self._held(), PULL_MAX_PER_REQUEST)
            try:
                response = self._client().pull(
                    request={"subscription": self.subscription_path, "max_messages": room},
                    timeout=PULL_RPC_TIMEOUT,
                    retry=None,
                )
            except gexc.DeadlineExceeded:
                continue  # nothing arrived during the long poll
            except Exception as exc:
                if self._closed:
                    return
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                log.warning("pubsub pull from %s failed (retrying in %.1fs): %r", self.subscription_path, backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
                continue
            backoff = 0.1
            now = time.monotonic()
            # Google delivers a key's messages in publish order
            # (https://cloud.google.com/pubsub/docs/ordering); pstest returns one Pull's
            # messages in any order. A stable sort by publish time is a no-op on Google.
            received = sorted(response.received_messages, key=_publish_time)
            leases = [self._lease(r, now) for r in received]
            if leases:
                try:  # from the subscription's ack deadline to ours, before anything else
                    self._modack([lease.ack_id for lease in leases], self.ack_deadline)
                except Exception as exc:
                    log.warning("pubsub lease extension of %d new message(s) failed: %r", len(leases), exc)
            with self._cond:
                self._error = None
                closed = self._closed
                if not closed:
                    for lease in leases:
                        self._gate.add(lease)
                    self._cond.notify_all()
            if closed:
                if leases:  # closed while pulling: give them back
                    try:
                        self._modack([lease.ack_id for lease in leases], 0)
                    except Exception:
                        log.debug("nack on close failed", exc_info=True)
                return

    def _keeper_loop(self) -> None:
        interval = max(1.0, self.ack_deadline / 3)
        while True:
            due = time.monotonic() + interval
            with self._cond:  # woken by every pull/ack too: wait out the interval regardless
                while not self._closed and (remaining := due - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                if self._closed:
                    return
            try:
                self.extend_leases()
            except Exception as exc:
                log.warning("pubsub lease extension failed: %r", exc)

    def extend_leases(self) -> None:
        """Extend every held message's ack deadline, except those held past the max lease."""
        now = time.monotonic()
        extend: list[str] = []
        with self._cond:
            for lease in self._gate.waiting():
                if now - lease.received_at >= self.max_lease:
                    self._gate.drop(lease)  # Pub/Sub redelivers it (and its key's later ones)
                    log.warning("message %s waited past the max lease; left to Pub/Sub", lease.message.message_id)
                else:
                    extend.append(lease.ack_id)
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
                    extend.append(lease.ack_id)
            if self._closed:
                return
        self._modack(extend, self.ack_deadline)

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
        )
        lease = Lease(received.ack_id, message, now, nbytes=len(m.data))
        message.handle = lease
        return lease


def _publish_time(received: Any) -> Any:
    published = getattr(received.message, "publish_time", None)  # test fakes may lack it
    return (published.timestamp(), getattr(published, "nanosecond", 0)) if published else (0.0, 0)
