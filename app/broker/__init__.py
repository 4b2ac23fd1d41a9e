"""Broker backends behind one interface; `make_broker` opens the one Settings names
(through `app.broker.registry`)."""

from __future__ import annotations

from app.broker.base import (
    BacklogStats,
    Broker,
    BrokerCapabilities,
    BrokerUnavailable,
    IdempotencyConflict,
    OutgoingMessage,
    PublishOutcomeUnknown,
    PublishResult,
    ReceivedMessage,
)
from app.broker.registry import open_broker as make_broker


__all__ = [
    "BacklogStats",
    "Broker",
    "BrokerCapabilities",
    "BrokerUnavailable",
    "IdempotencyConflict",
    "OutgoingMessage",
    "PublishOutcomeUnknown",
    "PublishResult",
    "ReceivedMessage",
    "make_broker",
]
