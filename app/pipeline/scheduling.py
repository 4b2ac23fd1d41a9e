"""What the subscriber holds between pull and ack: per-table queues, which table runs
next, flow control, and the count of terminal failures per message.

A table's messages are applied in pull order by one worker at a time: a table is
*claimed* from the moment it has work until a worker finished with it and nothing is
left. Tables are independent, so a table waiting for its retry time holds no worker
and the others go on. Flow control bounds what is held (messages and bytes), so
memory stays bounded while the loop keeps pulling for idle tables; and each table may
hold only its share of the messages, so a table stuck in an apply (a schema change that
takes minutes) or waiting for a retry cannot fill the window and stop the others.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

from app.broker.base import ReceivedMessage
from app.warehouse.base import Envelope

# A table at its hold limit hands the rest of a pull back for this long: long enough not
# to spend a delivery attempt (which Pub/Sub's dead-letter policy counts) every few
# seconds, short enough to catch up soon after the table moves again.
TABLE_FULL_RETRY_SECONDS = 60.0


@dataclass(slots=True)
class Held:
    """A pulled, decoded message the subscriber has neither acked nor nacked yet."""

    message: ReceivedMessage
    envelope: Envelope
    received_at: float  # time.monotonic() of the pull

    @property
    def size(self) -> int:
        return len(self.message.data)


@dataclass(eq=False)
class TableQueue:
    """One table's held messages, oldest first, and its retry state.

    `items` is shared with the pulling thread (guarded by the scheduler's lock); the
    retry fields are only touched by the worker that holds the claim.
    """

    name: str
    initial_backoff: float
    items: collections.deque[Held] = field(default_factory=collections.deque)
    claimed: bool = False
    backoff: float = 0.0  # next in-place retry delay
    isolate: int = 0  # apply this many of the oldest messages one by one (finding a culprit)
    last_error: str | None = None
    released_after_pull: int = -1  # the pull that was in flight when its messages were last nacked
    released_ids: frozenset[str] = frozenset()
    release_delay: float = 0.0

    def __post_init__(self) -> None:
        self.backoff = self.initial_backoff

    @property
    def settled(self) -> bool:
        """No retry or culprit search in progress: nothing worth remembering."""
        return self.backoff == self.initial_backoff and not self.isolate and self.last_error is None


class Scheduler:
    """Per-table queues, a heap of tables due for a worker, and flow control."""

    def __init__(
        self, *, max_messages: int, max_bytes: int, initial_backoff: float, max_messages_per_table: int | None = None
    ) -> None:
        self.max_messages = max_messages
        self.max_messages_per_table = min(max_messages_per_table or max_messages, max_messages)
        self.max_bytes = max_bytes
        self.initial_backoff = initial_backoff
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tables: dict[str, TableQueue] = {}
        self._due: list[tuple[float, int, str]] = []  # (when, tie-breaker, table) of claimed, waiting tables
        self._tie = itertools.count()
        self._pulls = 0
        self._stopping = False
        self.outstanding_messages = 0
        self.outstanding_bytes = 0

    # --- the pulling thread ---
    def wait_for_room(self, timeout: float) -> int:
        """How many messages may be pulled now; 0 if still full after `timeout`, or stopping."""
        end = time.monotonic() + timeout
        with self._changed:
            while not self._stopping and self._full():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return 0
                self._changed.wait(remaining)
            return 0 if self._stopping else self.max_messages - self.outstanding_messages

    def begin_pull(self) -> int:
        """Number the pull about to be made (see `hold`)."""
        with self._lock:
            self._pulls += 1
            return self._pulls

    def hold(self, table: str, items: list[Held], pull: int) -> tuple[list[Held], float, str]:
        """Queue a pull's messages of `table`; claim the table for a worker if it was idle.

        Returns messages to nack at once, the delay and why:
        - "ordering": the table's held messages were nacked while this pull was in flight,
          and none of them is in it again: these may have been pulled before that nack
          reached the broker and must not overtake the nacked ones;
        - "table_full": the newest of them, beyond the table's hold limit. Only a tail is
          handed back, so the held ones still apply first; a broker with ordered keys
          delivers none of the key's later messages before the handed-back ones.
        """
        with self._changed:
            queue = self._tables.get(table)
            if queue is None:
                queue = self._tables[table] = TableQueue(table, self.initial_backoff)
            if pull <= queue.released_after_pull:
                if not any(h.message.message_id in queue.released_ids for h in items):
                    return items, queue.release_delay, "ordering"
            else:
                queue.released_ids = frozenset()
            room = max(0, self.max_messages_per_table - len(queue.items))
            items, beyond = items[:room], items[room:]
            if not items:
                return beyond, TABLE_FULL_RETRY_SECONDS, "table_full"
            queue.items.extend(items)
            self.outstanding_messages += len(items)
            self.outstanding_bytes += sum(h.size for h in items)
            if not queue.claimed and not self._stopping:
                queue.claimed = True
                self._push(queue, time.monotonic())
            return beyond, TABLE_FULL_RETRY_SECONDS, "table_full"

    # --- workers ---
    def next_tables(self, max_tables: int) -> list[TableQueue]:
        """Block until a claimed table is due; then take every due table, most overdue
        first, up to `max_tables` (applied together). Empty once stopping."""
        with self._changed:
            while not self._stopping:
                if self._due:
                    when = self._due[0][0]
                    now = time.monotonic()
                    if when <= now:
                        due = []
                        while self._due and self._due[0][0] <= now and len(due) < max_tables:
                            due.append(self._tables[heapq.heappop(self._due)[2]])
                        return due
                    self._changed.wait(when - now)
                else:
                    self._changed.wait()
            return []

    def next_table(self) -> TableQueue | None:
        """One due table (blocking as `next_tables`); None once stopping."""
        due = self.next_tables(1)
        return due[0] if due else None

    def batch(self, queue: TableQueue, max_messages: int, max_bytes: int) -> list[Held]:
        """The oldest held messages of `queue`, at least one, within both bounds."""
        with self._lock:
            out: list[Held] = []
            size = 0
            for held in queue.items:
                if out and (len(out) >= max_messages or size + held.size > max_bytes):
                    break
                out.append(held)
                size += held.size
            return out

    def held_by_table(self) -> dict[str, int]:
        """How many messages each table holds (tables holding none left out)."""
        with self._lock:
            return {name: len(queue.items) for name, queue in self._tables.items() if queue.items}

    def oldest_published(self) -> dict[str, float]:
        """Per table holding messages, the broker's publish time of its oldest one (when known)."""
        with self._lock:
            return {
                name: queue.items[0].message.published_at  # type: ignore[misc]
                for name, queue in self._tables.items()
                if queue.items and queue.items[0].message.published_at is not None
            }

    def held_since(self, queue: TableQueue) -> float | None:
        with self._lock:
            return queue.items[0].received_at if queue.items else None

    def done(self, queue: TableQueue, count: int) -> None:
        """The oldest `count` messages of `queue` were acked."""
        with self._changed:
            for _ in range(min(count, len(queue.items))):
                self._forget(queue.items.popleft())
            self._changed.notify_all()

    def release(self, queue: TableQueue, delay: float) -> list[Held]:
        """Take every held message of `queue` out, to be nacked with `delay`."""
        with self._changed:
            return self._take_all(queue, delay)

    def release_waiting(self, min_wait: float) -> list[tuple[str, list[Held], float]]:
        """Take out the messages of every table waiting at least `min_wait` more for its
        retry, with the wait left: when flow control is full, they would keep every
        other table from being pulled until then."""
        with self._changed:
            now = time.monotonic()
            waiting = [(when, name) for when, _, name in self._due if when - now >= min_wait]
            if not waiting:
                return []
            self._due = [entry for entry in self._due if entry[0] - now < min_wait]
            heapq.heapify(self._due)
            released = []
            for when, name in waiting:
                queue = self._tables[name]
                queue.claimed = False
                released.append((name, self._take_all(queue, when - now), when - now))
            return released

    def finish(self, queue: TableQueue, retry_at: float | None) -> None:
        """The worker is done with `queue` for now: run it again at `retry_at` (or at once)
        if it still holds messages, else unclaim it."""
        with self._changed:
            if queue.items and not self._stopping:
                self._push(queue, retry_at if retry_at is not None else time.monotonic())
                return
            queue.claimed = False
            if not queue.items and queue.settled and queue.released_after_pull < self._pulls:
                self._tables.pop(queue.name, None)

    # --- shutdown ---
    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def drain(self) -> list[Held]:
        """Everything still held (after the workers stopped), oldest first per table."""
        with self._changed:
            items = [held for queue in self._tables.values() for held in queue.items]
            for queue in self._tables.values():
                queue.items.clear()
            self.outstanding_messages = self.outstanding_bytes = 0
            self._due.clear()
            return items

    # --- inside the lock ---
    def _full(self) -> bool:
        return self.outstanding_messages >= self.max_messages or self.outstanding_bytes >= self.max_bytes

    def _push(self, queue: TableQueue, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._tie), queue.name))
        self._changed.notify_all()

    def _take_all(self, queue: TableQueue, delay: float) -> list[Held]:
        items = list(queue.items)
        queue.items.clear()
        for held in items:
            self._forget(held)
        queue.released_after_pull = self._pulls
        queue.released_ids = frozenset(h.message.message_id for h in items)
        queue.release_delay = delay
        self._changed.notify_all()
        return items

    def _forget(self, held: Held) -> None:
        self.outstanding_messages -= 1
        self.outstanding_bytes -= held.size


class TerminalFailures:
    """Terminal (non-transient) failures per `dedup_id` seen by this process.

    Pub/Sub's `delivery_attempt` counts every nack and lease expiry, transient ones
    included, and is 0 without a dead-letter policy
    (https://cloud.google.com/pubsub/docs/handling-failures), so it cannot decide alone
    whether a message "keeps failing". Bounded: the oldest entries are forgotten first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, dedup_id: str) -> int:
        """Count one more failure; return the count."""
        with self._lock:
            count = self._counts.pop(dedup_id, 0) + 1
            self._counts[dedup_id] = count
            while len(self._counts) > self.capacity:
                self._counts.popitem(last=False)
            return count

    def forget(self, dedup_ids: list[str]) -> None:
        with self._lock:
            for dedup_id in dedup_ids:
                self._counts.pop(dedup_id, None)
