"""What tests of the apply loop look at: calls per table, what each applied, overlaps."""

from __future__ import annotations

import collections
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

from app.messages.envelope import Envelope


class ApplyObserver:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: collections.Counter[str] = collections.Counter()
        self.attempts: collections.Counter[str] = collections.Counter()  # table -> apply calls
        self.applied: dict[str, list[list[Envelope]]] = collections.defaultdict(list)  # table -> envelopes per commit
        self.overlaps: list[str] = []  # tables applied twice at once
        self.max_running = 0  # most applies at once, all tables

    @contextmanager
    def call(self, table: str) -> Iterator[None]:
        with self._lock:
            self.attempts[table] += 1
            self._running[table] += 1
            if self._running[table] > 1:
                self.overlaps.append(table)
            self.max_running = max(self.max_running, sum(self._running.values()))
        try:
            yield
        finally:
            with self._lock:
                self._running[table] -= 1

    def committed(self, table: str, envelopes: Sequence[Envelope]) -> None:
        with self._lock:
            self.applied[table].append(list(envelopes))
