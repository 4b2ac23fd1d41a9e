"""Broker backends behind one interface; `make_broker` picks one from Settings."""

from __future__ import annotations

from app.broker.base import (
    BacklogStats,
    Broker,
    BrokerUnavailable,
    IdempotencyConflict,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
)
from app.settings import Settings


def make_broker(settings: Settings) -> Broker:
    if settings.broker == "pubsub":
        from app.broker.pubsub import PubSubBroker

        return PubSubBroker(settings)
    from app.broker.local import LocalBroker

    return LocalBroker(settings)


__all__ = [
    "BacklogStats",
    "Broker",
    "BrokerUnavailable",
    "IdempotencyConflict",
    "OutgoingMessage",
    "PublishResult",
    "ReceivedMessage",
    "make_broker",
]
