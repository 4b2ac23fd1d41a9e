"""The API's side of receipts: accepted batches are queued from the request and written
by one thread in batches, so a request pays for a queue put, not a SQLite commit.

A lookup flushes the queue first, so a receipt asked for right after its POST is there.
Receipts queued but not written when the process dies are lost (a report, not the data).
The same thread purges receipts past the retention every `PURGE_EVERY_SECONDS`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Sequence

from app.broker import OutgoingMessage
from app.receipts.store import Accepted, Receipt, ReceiptStore

log = logging.getLogger("app.receipts")

PURGE_EVERY_SECONDS = 3600.0
_STOP = object()


def shares_of(messages: Sequence[OutgoingMessage]) -> list[Accepted]:
    """Each table's messages and activities, in the order the tables come."""
    message_counts: Counter[str] = Counter()
    activity_counts: Counter[str] = Counter()
    for m in messages:
        table = m.attributes["table"]
        message_counts[table] += 1
        activity_counts[table] += int(m.attributes.get("count", 0))
    return [Accepted(t, message_counts[t], activity_counts[t]) for t in message_counts]


class ReceiptWriter:
    def __init__(self, store: ReceiptStore, retention_seconds: float) -> None:
        self.store = store
        self.retention_seconds = retention_seconds
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="receipts", daemon=True)
        self._thread.start()

    def accepted(self, batch_id: str, key_id: str | None, messages: Sequence[OutgoingMessage]) -> None:
        self._queue.put((batch_id, key_id, time.time(), shares_of(messages)))

    def flush(self) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def lookup(self, batch_id: str) -> Receipt | None:
        self.flush()
        return self.store.lookup(batch_id)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        purged_at = float("-inf")
        while True:
            items = [self._queue.get()]
            while True:  # everything queued meanwhile goes in the same transaction
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batches = [i for i in items if isinstance(i, tuple)]
            try:
                self.store.add_accepted(batches)
                if time.monotonic() - purged_at >= PURGE_EVERY_SECONDS:
                    purged_at = time.monotonic()
                    self.store.purge(self.retention_seconds)
            except Exception:
                log.exception("could not record %d receipt(s)", len(batches))
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
            if any(item is _STOP for item in items):
                return
