"""A token bucket per key id: `rate` activities per second, up to `capacity` at once."""

from __future__ import annotations

import math
from typing import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when)

    def take(self, key_id: str, rate: float, capacity: float, count: int) -> float | None:
        """Takes `count` tokens; None when allowed, else the seconds to wait before retrying.

        A batch larger than the bucket passes when the bucket is full and leaves it in
        debt, so a large batch is slowed by the rate, not refused forever.
        """
        now = self.clock()
        bucket = self._buckets.get(key_id)
        tokens = capacity if bucket is None else bucket[0] + (now - bucket[1]) * rate
        if tokens > capacity:
            tokens = capacity
        if tokens >= count or tokens >= capacity:  # a batch larger than the bucket passes from a full one
            self._buckets[key_id] = (tokens - count, now)
            return None
        self._buckets[key_id] = (tokens, now)
        return ((count if count < capacity else capacity) - tokens) / rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
