"""The ingest handler's key rules: 401 (who), 403 (what), 429 (how much), and the per-key metrics.

- 401: no key, an unknown one, an expired or a disabled one.
- 403: an activity outside the key's tables or operations; names the first such activity
  (index, table, operation) and nothing is published.
- 429 with Retry-After: the key's rate (activities per second) is used up.
"""

from __future__ import annotations

import time
from typing import Callable

from app import metrics
from app.api.auth import parse_api_keys
from app.api.errors import ApiError
from app.keys import ApiKey, KeyRing
from app.keys.entries import ENV_KEY_PREFIX
from app.keys.limiter import RateLimiter, retry_after_header
from app.keys.usage import UsageLog, usage_file
from app.schema.activity import Activity
from app.schema.columnar import ActivityRun
from app.settings import Settings


def key_ring(settings: Settings, clock: Callable[[], float] = time.monotonic) -> KeyRing:
    """`API_KEYS` as keys with every scope, plus the entries of `API_KEYS_FILE`."""
    env_keys = [ApiKey(id=f"{ENV_KEY_PREFIX}{i}", digest=d, from_env=True) for i, d in enumerate(parse_api_keys(settings.api_keys), 1)]
    return KeyRing(
        env_keys, settings.api_keys_file, UsageLog(usage_file(settings.data_dir)), clock,
        tally_of=metrics.INGEST.tally_of,
    )


class KeyGate:
    def __init__(self, ring: KeyRing, clock: Callable[[], float] = time.monotonic) -> None:
        self.ring = ring
        self.enabled = ring.enabled  # fixed at start: whether API_KEYS or API_KEYS_FILE is set
        self.limiter = RateLimiter(clock)

    def authenticate(self, headers: dict[bytes, bytes]) -> ApiKey | None:
        """The key of a request with these raw headers (`request_headers`); None when keys are off. Raises 401."""
        if not self.enabled:
            return None
        key = self.ring.authenticate_request(headers)
        if key is None:
            raise unauthorized()
        return key

    def authorize(self, key: ApiKey, body: dict, validated: list[Activity] | list[ActivityRun], count: int) -> None:
        """Raises 403 for the first activity out of scope, then 429 over the rate."""
        # Runs are grouped by table, so check the few (table, operation) pairs there and
        # find the offending activity's index in the request only when there is one.
        remembered = key.scope_answers  # `key.allows`' remembered answers, read here first: one call less
        for item in validated:
            operations = remembered.get(item.table)
            if (operations is None or item.operation not in operations) and not key.allows(item.table, item.operation):
                raise out_of_scope(key, body)
        rate = key.rate
        if rate is not None:
            # `RateLimiter.take`'s two passing cases, inlined (it runs on every request); a
            # refusal goes through `take` itself.
            limiter = self.limiter
            now, full = limiter.clock(), limiter.full_at
            full_at = full.get(key.id, now)
            if full_at <= now:
                full[key.id] = now + count / rate
                return
            if (full_at - now) * rate <= (key.burst or rate) - count:
                full[key.id] = full_at + count / rate
                return
            wait = limiter.take(key.id, rate, key.burst or rate, count)
            if wait is not None:
                raise ApiError(
                    429, f"key {key.id!r} is over its rate of {rate:g} activities per second; retry later",
                    headers={"Retry-After": retry_after_header(wait)},
                )

    def close(self) -> None:
        if self.ring.usage is not None:
            self.ring.usage.save(self.ring.clock())


def unauthorized() -> ApiError:
    return ApiError(
        401, "missing, wrong, expired or revoked API key: send Authorization: Bearer <key> or X-API-Key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def out_of_scope(key: ApiKey, body: dict) -> ApiError:
    """The 403 naming the body's first activity outside the key's scope."""
    index, table, operation = next(
        (i, a["table"], a["operation"]) for i, a in enumerate(body["user_activities"])
        if not key.allows(a["table"], a["operation"])
    )
    return ApiError(
        403, f"key {key.id!r} may not {operation} in table {table!r}; nothing was published",
        [{"loc": f"user_activities.{index}", "message": f"{operation} in table {table!r} is outside the key's scope",
          "index": index, "table": table, "operation": operation}],
    )
