"""Columns this process widened lately, which the Storage Write API may still see with their old type.

The write stream learns of a schema update only "after some time (in order of minutes)"
(https://cloud.google.com/java/docs/reference/google-cloud-bigquerystorage/latest/com.google.cloud.bigquery.storage.v1.SchemaAwareStreamWriter;
a stream's table schema "could go out of date during the life time of the stream":
https://cloud.google.com/python/docs/reference/bigquerystorage/latest/google.cloud.bigquery_storage_v1.types.WriteStream).
A type change (`ALTER COLUMN ... SET DATA TYPE`, widening.py) is such an update, and no
StorageError code names it: until the stream sees the new type, an append carrying the
widened column is refused like bad data. So a refused append that carries a column this
process widened less than `WIDENED_TYPE_LAG_SECONDS` ago is a wait (`SchemaPendingError`),
not bad rows to dead-letter. A widening done by another process, or before a restart,
is not known here: such a refusal dead-letters as before (replayable).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

WIDENED_TYPE_LAG_SECONDS = 600.0  # "in order of minutes"
MAX_TABLES = 10_000  # bounded: entries older than the lag are dropped first


class RecentWidenings:
    def __init__(self, lag_seconds: float = WIDENED_TYPE_LAG_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.lag_seconds = lag_seconds
        self._clock = clock
        self._widened: dict[str, dict[str, float]] = {}  # table -> column -> when
        self._lock = threading.Lock()

    def note(self, table: str, columns: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            if len(self._widened) >= MAX_TABLES:
                self._forget_older_than(now - self.lag_seconds)
            self._widened.setdefault(table, {}).update({c: now for c in columns})

    def pending(self, table: str, columns: Iterable[str]) -> list[str]:
        """The `columns` of `table` widened less than the lag ago."""
        since = self._clock() - self.lag_seconds
        with self._lock:
            widened = self._widened.get(table, {})
            return [c for c in columns if widened.get(c, since) > since]

    def _forget_older_than(self, since: float) -> None:
        for table in list(self._widened):
            kept = {c: t for c, t in self._widened[table].items() if t > since}
            if kept:
                self._widened[table] = kept
            else:
                del self._widened[table]
