"""A token bucket per key id: `rate` activities per second, up to `capacity` at once.

Kept as one number per key, the time at which its bucket is full again (the "theoretical
arrival time" of GCRA): the tokens at `now` are `capacity - (full_at - now) * rate`. So a
request reads the clock once and stores one float, with no tuple and no refill step.

Only the event loop's thread calls `take` (the ingest handler), so the read-then-store
needs no lock: no other thread runs between them on this dict entry.
"""

from __future__ import annotations

import math
from typing import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.full_at: dict[str, float] = {}  # key id -> when its bucket is full again

    def take(self, key_id: str, rate: float, capacity: float, count: int) -> float | None:
        """Takes `count` tokens; None when allowed, else the seconds to wait before retrying.

        A batch larger than the bucket passes when the bucket is full and leaves it in
        debt, so a large batch is slowed by the rate, not refused forever.
        """
        now = self.clock()
        full_at = self.full_at.get(key_id, now)  # a bucket not seen yet is full
        if full_at <= now:  # full: any batch passes (a larger one leaves debt)
            self.full_at[key_id] = now + count / rate
            return None
        missing = (full_at - now) * rate  # capacity minus the tokens there are
        if missing <= capacity - count:
            self.full_at[key_id] = full_at + count / rate
            return None
        return ((count if count < capacity else capacity) - (capacity - missing)) / rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
