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


class _Item:  # an Activity or an ActivityRun, as `KeyGate.authorize` reads them
    def __init__(self, table: str, operation: str) -> None:
        self.table, self.operation = table, operation


def _body(*items: _Item) -> dict:
    return {"user_activities": [{"table": i.table, "operation": i.operation} for i in items]}


def test_authorize_answers_the_same_once_its_scope_answers_are_remembered(tmp_path):
    from app.api.errors import ApiError
    from app.api.keys import KeyGate
    from app.keys import KeyRing, new_key

    clock = Clock()
    gate = KeyGate(KeyRing([]), clock)
    key, _ = new_key("k", ["orders*"], ["insert"], rate=10, burst=20)
    good = [_Item("orders", "insert"), _Item("orders_eu", "insert")]
    for _ in range(2):  # the second time from the remembered answers
        gate.authorize(key, _body(*good), good, 2)
        for bad, index in (([*good, _Item("orders", "delete")], 2), ([_Item("users", "insert")], 0)):
            with pytest.raises(ApiError) as refused:
                gate.authorize(key, _body(*bad), bad, len(bad))
            assert refused.value.status == 403 and refused.value.details[0]["index"] == index
    narrowed, _ = new_key("k", ["orders"], ["insert"])  # a reload makes new keys: nothing remembered carries over
    with pytest.raises(ApiError):
        gate.authorize(narrowed, _body(*good), good, 2)
    with pytest.raises(ApiError) as limited:  # 4 taken above, 20 more is over the burst
        gate.authorize(key, _body(*good), good, 20)
    assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "1"
    clock.now += 0.4
    gate.authorize(key, _body(*good), good, 20)  # refilled at `rate`: the bucket is full again
