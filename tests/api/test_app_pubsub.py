"""The API over the Pub/Sub broker (pstest): Idempotency-Key semantics where the broker
keeps no record of keys."""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.broker.pubsub import PubSubBroker
from app.provision import provision_pubsub
from app.settings import Settings
from tests.support.pstest import running_pstest

pytestmark = pytest.mark.emulator

PATH = "/api-log/v1/"


def body(value: int) -> dict:
    return {
        "user_activities": [
            {"operation": "insert", "table": "t", "col_names": ["n"], "col_types": ["integer"], "col_values": [value]}
        ]
    }


@pytest.fixture(scope="module")
def pstest_host():
    with running_pstest() as address, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", address)
        yield address


@pytest.fixture
def settings(pstest_host, tmp_path) -> Settings:
    name = uuid.uuid4().hex[:8]
    s = Settings(
        broker="pubsub", data_dir=tmp_path, gcp_project="test-project", pubsub_topic=f"topic-{name}",
        pubsub_subscription=f"sub-{name}", ack_deadline_seconds=10, publish_timeout_seconds=5,
    )
    provision_pubsub(s)
    return s


def pulled_dedup_ids(settings: Settings, count: int) -> list[str]:
    broker = PubSubBroker(settings)
    got = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            batch = broker.pull(10, 0.5)
            broker.ack(batch)
            got.extend(m.dedup_id for m in batch)
        assert broker.pull(10, 1.5) == []
    finally:
        broker.close()
    return got


def test_same_key_other_body_gets_its_own_batch_and_is_not_dropped(settings):
    with TestClient(create_app(settings)) as client:
        first = client.post(PATH, json=body(1), headers={"Idempotency-Key": "k"})
        retry = client.post(PATH, json=body(1), headers={"Idempotency-Key": "k"})
        other = client.post(PATH, json=body(2), headers={"Idempotency-Key": "k"})
    assert [r.status_code for r in (first, retry, other)] == [200, 200, 200]
    assert first.json()["batch_id"] == retry.json()["batch_id"] != other.json()["batch_id"]
    # The retry re-published the first body's dedup id (the warehouse drops it); the other
    # body travels under its own, so it is applied.
    ids = pulled_dedup_ids(settings, 3)
    assert sorted(ids) == sorted([f"{first.json()['batch_id']}:t:0"] * 2 + [f"{other.json()['batch_id']}:t:0"])


class LandsWithoutAnswer:
    """A publisher client whose publishes reach Pub/Sub but whose answers never come back:
    what a publish timed out on the client's side, yet accepted by Pub/Sub, looks like."""

    def __init__(self, real) -> None:
        self.real = real

    def publish(self, topic, data, **kwargs):
        self.real.publish(topic, data, **kwargs).result(timeout=10)
        return concurrent.futures.Future()  # never resolved

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_timed_out_publish_answers_503_saying_it_may_have_landed_and_a_keyed_retry_is_one_batch(settings):
    settings = settings.model_copy(update={"publish_timeout_seconds": 1})
    broker = PubSubBroker(settings)
    publisher = broker._publisher
    real = publisher.client
    with TestClient(create_app(settings, broker=broker)) as client:
        publisher._client = LandsWithoutAnswer(real)
        timed_out = client.post(PATH, json=body(1), headers={"Idempotency-Key": "k"})
        publisher._client = real
        retry = client.post(PATH, json=body(1), headers={"Idempotency-Key": "k"})
    assert timed_out.status_code == 503 and timed_out.headers["retry-after"] == "1"
    message = timed_out.json()["message"]
    assert "may still have been accepted" in message and "same Idempotency-Key" in message
    assert retry.status_code == 200
    # Both copies landed under one dedup id: the warehouse applies the batch once.
    assert pulled_dedup_ids(settings, 2) == [f"{retry.json()['batch_id']}:t:0"] * 2
