"""Pub/Sub publisher helpers (`app.broker.pubsub.publisher`); publishing itself runs on
pstest in test_pubsub.py and test_contract.py."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from google.api_core import exceptions as gexc

from app.broker.base import BrokerUnavailable, OutgoingMessage, PublishOutcomeUnknown
from app.broker.pubsub.publisher import Publisher, fit_attribute, retryable
from app.settings import Settings


def test_reasons_are_cut_to_the_attribute_limit_without_splitting_a_character():
    reason = "é" * 700  # 1,400 bytes
    cut = fit_attribute(reason)
    assert len(cut.encode()) <= 1024 and cut == "é" * 512
    assert fit_attribute("short") == "short"


def test_transient_publish_errors_are_retried_and_others_are_not():
    assert retryable(gexc.ServiceUnavailable("x")) and retryable(gexc.ResourceExhausted("x"))
    assert not retryable(gexc.PermissionDenied("x")) and not retryable(gexc.NotFound("x"))


class RefusingClient:
    """A publisher client whose every publish Pub/Sub refuses outright."""

    def publish(self, topic, data, **kwargs):
        future = concurrent.futures.Future()
        future.set_exception(gexc.PermissionDenied("no publish permission"))
        return future


class SilentClient:
    """A publisher client that takes every message and never answers."""

    def publish(self, topic, data, **kwargs):
        return concurrent.futures.Future()


def publish_with(client, timeout: float = 0.3) -> BaseException:
    publisher = Publisher(Settings(broker="pubsub", publish_timeout_seconds=timeout), "projects/p/topics/t")
    publisher._client = client
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(publisher.publish([OutgoingMessage(b"x", "t", {"dedup_id": "b:t:0"})]))
    return raised.value


def test_a_publish_without_an_answer_may_have_landed_and_says_so():
    assert isinstance(publish_with(SilentClient()), PublishOutcomeUnknown)


def test_a_refused_publish_is_unavailable_without_doubt():
    assert not isinstance(publish_with(RefusingClient()), PublishOutcomeUnknown)
