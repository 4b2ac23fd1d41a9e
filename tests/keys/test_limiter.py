"""The token bucket: a burst passes, then the rate; a too-large batch passes only from a full bucket."""

from __future__ import annotations

import pytest

from app.keys.limiter import RateLimiter, retry_after_header


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.take("k", 10, 20, 20) is None
    assert limiter.take("k", 10, 20, 5) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("k", 10, 20, 5) is None
    assert limiter.take("other", 10, 20, 20) is None  # buckets are per key


def test_a_batch_larger_than_the_bucket_passes_when_full_and_leaves_debt():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.take("k", 10, 20, 50) is None
    assert limiter.take("k", 10, 20, 1) == pytest.approx(3.1)  # 30 of debt, then one more
    assert retry_after_header(3.1) == "4" and retry_after_header(0.01) == "1"
