"""Freshness: when each table last applied, how long messages took from publish to apply,
and which tables are behind.

- `warehouse_table_last_applied_timestamp_seconds{table}`: set at each successful apply
  (after the warehouse committed, before the ack).
- `pipeline_end_to_end_lag_seconds`: one observation per applied message, from the
  broker's publish time (`ReceivedMessage.published_at`) to that commit.
- `behind`: for `/readyz`, the tables whose oldest held (pulled, not yet applied) message
  was published more than `LAG_WARN_SECONDS` ago. A backlog in the broker shows there
  as soon as its messages are pulled, since their publish time is the broker's.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from app import metrics


class Freshness:
    def __init__(self, lag_warn_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.lag_warn_seconds = lag_warn_seconds
        self.clock = clock

    def applied(self, table: str, published: Iterable[float | None]) -> None:
        """A table's messages, published at these times, were just committed."""
        now = self.clock()
        metrics.TABLE_LAST_APPLIED.labels(table).set(now)
        for at in published:
            if at is not None:  # a broker that does not say is not guessed at
                metrics.END_TO_END_LAG_SECONDS.observe(max(0.0, now - at))  # clocks of two hosts may disagree a little

    def behind(self, oldest_published: dict[str, float]) -> dict[str, float]:
        """{table: seconds its oldest held message has waited since publish}, over the limit only."""
        now = self.clock()
        return {
            table: round(now - at, 1)
            for table, at in sorted(oldest_published.items())
            if now - at > self.lag_warn_seconds
        }
