"""The API over the Pub/Sub broker (pstest): Idempotency-Key semantics where the broker
keeps no record of keys."""

from __future__ import annotations

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
