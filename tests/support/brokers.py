"""A broker stand-in for API tests that need a failure the real brokers can't be told to have."""

from __future__ import annotations

import asyncio

from app.broker.base import PORTABLE_LIMITS, Broker, BrokerCapabilities, PublishResult


class StubBroker(Broker):
    """Publishes nothing: raises `publish_error` (or waits `publish_delay` and succeeds)."""

    name = "stub"
    capabilities = BrokerCapabilities(
        message=PORTABLE_LIMITS,
        ordered_keys=True,
        remembers_idempotency_keys=False,
        min_ack_deadline_seconds=0.0,
        max_ack_deadline_seconds=None,
        max_lease_seconds=None,
        has_dead_letter_destination=False,
        reports_backlog=False,
    )

    def __init__(self, *, publish_error: Exception | None = None, publish_delay: float = 0.0,
                 ready: tuple[bool, str] = (True, "ok"), backlog_error: Exception | None = None) -> None:
        self.publish_error = publish_error
        self.publish_delay = publish_delay
        self._ready = ready
        self.backlog_error = backlog_error

    async def publish(self, messages, *, batch_id, idempotency_key=None, request_fingerprint=None) -> PublishResult:
        if self.publish_delay:
            await asyncio.sleep(self.publish_delay)
        if self.publish_error is not None:
            raise self.publish_error
        return PublishResult(batch_id, len(messages))

    def pull(self, max_messages, timeout):
        return []

    def ack(self, messages):
        pass

    def nack(self, messages, delay_seconds=0.0):
        pass

    def ready(self):
        return self._ready

    def backlog(self):
        if self.backlog_error is not None:
            raise self.backlog_error
        return None
