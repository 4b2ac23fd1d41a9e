"""The API's side of receipts: accepted batches are queued from the request and written
by one thread in batches, so a request pays for an append, not a SQLite commit.

A lookup flushes the queue first, so a receipt asked for right after its POST is there.
A write that fails (a store out of reach) is tried again later, backing off from
`RETRY_FIRST_SECONDS` to `RETRY_MAX_SECONDS` (a down store is not hammered every turn),
up to `MAX_HELD_BATCHES` held; receipts queued but not written when the process dies are lost
(a report, not the data).
The same thread purges receipts past the retention every `PURGE_EVERY_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Sequence

from app.broker import OutgoingMessage
from app.receipts.base import Accepted, Receipt, ReceiptStore

log = logging.getLogger("app.receipts")

PURGE_EVERY_SECONDS = 3600.0
WRITE_EVERY_SECONDS = 0.05
MAX_HELD_BATCHES = 100_000  # kept for another try while the store is out of reach
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


def shares_of(counts: Sequence[tuple[str, str]], quarantined: Sequence[tuple[str, int]] = ()) -> list[Accepted]:
    """Each table's messages and activities from (table, count) per message, and its
    quarantined activities, in the order the tables come."""
    message_counts: Counter[str] = Counter()
    activity_counts: Counter[str] = Counter()
    for table, count in counts:
        message_counts[table] += 1
        activity_counts[table] += int(count)
    quarantined_counts = dict(quarantined)
    tables = [*message_counts, *(t for t in quarantined_counts if t not in message_counts)]
    return [Accepted(t, message_counts[t], activity_counts[t], quarantined_counts.get(t, 0)) for t in tables]


class ReceiptWriter:
    def __init__(self, store: ReceiptStore, retention_seconds: float) -> None:
        self.store = store
        self.retention_seconds = retention_seconds
        # A deque, not a queue: appending wakes no thread, which costs the request path
        # several microseconds; the writer looks every WRITE_EVERY_SECONDS instead.
        self._pending: deque[tuple] = deque()
        self._write_lock = threading.Lock()
        self._held: list[tuple] = []  # written batches the store refused, for the next flush
        self._retry_delay = 0.0  # after a refused write: the wait before the writer tries again
        self._retry_at = float("-inf")
        self._stop = threading.Event()
        self._purged_at = float("-inf")
        self._thread = threading.Thread(target=self._run, name="receipts", daemon=True)
        self._thread.start()

    def accepted(
        self, batch_id: str, key_id: str | None, messages: Sequence[OutgoingMessage],
        quarantined: tuple[tuple[str, int], ...] = (),
    ) -> None:
        """A published batch: its messages, and (table, activities) a contract quarantined."""
        # Only strings kept, not the messages: the collector stops tracking such tuples
        # instead of walking them (and the bodies they'd keep alive) until the next write.
        if len(messages) == 1:  # most requests: no comprehension (a call of its own)
            attributes = messages[0].attributes
            counts: tuple[tuple[str, str], ...] = ((attributes["table"], attributes.get("count", "0")),)
        else:
            counts = tuple([(m.attributes["table"], m.attributes.get("count", "0")) for m in messages])
        self._pending.append((batch_id, key_id, time.time(), counts, quarantined))  # summed by the writer, off the request

    def flush(self) -> None:
        """Writes what is pending now (a lookup's receipt included)."""
        with self._write_lock:
            batches = list(self._held)
            self._held.clear()
            while self._pending:
                batch_id, key_id, accepted_at, counts, quarantined = self._pending.popleft()
                batches.append((batch_id, key_id, accepted_at, shares_of(counts, quarantined)))
            if not batches:
                return
            try:
                self.store.add_accepted(batches)
            except Exception as exc:
                kept = batches[-MAX_HELD_BATCHES:]
                self._held.extend(kept)
                self._retry_delay = min(RETRY_MAX_SECONDS, self._retry_delay * 2 or RETRY_FIRST_SECONDS)
                self._retry_at = time.monotonic() + self._retry_delay
                log.warning("could not record %d receipt(s), kept %d for another try in %.0fs: %s",
                            len(batches), len(kept), self._retry_delay, exc)
            else:
                self._retry_delay = 0.0

    def lookup(self, batch_id: str) -> Receipt | None:
        self.flush()
        return self.store.lookup(batch_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        self.store.close()

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY_SECONDS):
            if time.monotonic() >= self._retry_at:  # a lookup's flush does not wait
                self.flush()
            if time.monotonic() - self._purged_at >= PURGE_EVERY_SECONDS:
                self._purged_at = time.monotonic()
                try:
                    self.store.purge(self.retention_seconds)
                except Exception:
                    log.exception("could not purge old receipts")
