"""Pub/Sub publisher helpers (`app.broker.pubsub.publisher`); publishing itself runs on
pstest in test_pubsub.py and test_contract.py."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from google.api_core import exceptions as gexc

from app.broker.base import BrokerUnavailable, OutgoingMessage
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


class _SilentClient:
    """A publisher client that takes every message and never answers (a timed-out publish)."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def publish(self, topic, data, **kwargs):
        self.published.append(data)
        return concurrent.futures.Future()  # never resolved

    def resume_publish(self, topic, key) -> None:
        pass


def _publisher(tmp_path, client) -> Publisher:
    publisher = Publisher(Settings(data_dir=tmp_path, publish_timeout_seconds=0.3), "projects/p/topics/t")
    publisher._client = client
    return publisher


def test_a_publish_handed_over_without_an_answer_may_have_been_accepted(tmp_path):
    client = _SilentClient()
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(_publisher(tmp_path, client).publish([OutgoingMessage(b"x", "t", {})]))
    assert client.published and raised.value.maybe_published


class _NoCredentialsPublisher(Publisher):
    @property
    def client(self):  # building the client fails before any message is handed over
        raise RuntimeError("no credentials")


def test_a_publish_that_never_reached_the_client_was_not_accepted(tmp_path):
    publisher = _NoCredentialsPublisher(Settings(data_dir=tmp_path, publish_timeout_seconds=0.3), "projects/p/topics/t")
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(publisher.publish([OutgoingMessage(b"x", "t", {})]))
    assert not raised.value.maybe_published
