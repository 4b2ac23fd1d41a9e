"""Fixtures for the broker tests: a session-wide Pub/Sub emulator (Google's pstest) and the
backends the contract suite runs against."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from app.broker.base import Broker
from app.broker.local import LocalBroker
from app.broker.pubsub import PubSubBroker
from app.provision import provision_pubsub
from app.settings import Settings
from tests.support.local_broker import broker, make_broker  # noqa: F401  (local broker fixtures)
from tests.support.pstest import running_pstest


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[str]:
    """host:port of a running pstest, exported as PUBSUB_EMULATOR_HOST for the session.

    Skips when pstest cannot be built or started, except with CI=true where it fails.
    """
    with running_pstest() as address, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", address)
        yield address


# --------------------------------------------------------------------------- contract suite
# test_contract.py runs against every entry of BACKENDS. A backend is a factory of
# brokers that share one stream (so a second broker is "another replica" or "after a
# restart"). `enforces_ordering` is False for pstest, which stores ordering keys but
# does not enforce them: per-key order is asserted only where the backend enforces it.


@dataclass
class BrokerBackend:
    name: str
    make: Callable[..., Broker]  # make(**settings overrides) -> a broker on the shared stream
    enforces_ordering: bool
    min_ack_deadline: float  # shortest lease the backend accepts


def _local_backend(request, tmp_path) -> BrokerBackend:
    def make(**overrides) -> Broker:
        return LocalBroker(Settings(data_dir=tmp_path, **overrides))

    return BrokerBackend("local", make, enforces_ordering=True, min_ack_deadline=1.0)


def _pubsub_backend(request, tmp_path) -> BrokerBackend:
    request.getfixturevalue("pubsub_emulator")
    name = uuid.uuid4().hex[:8]
    base = Settings(
        broker="pubsub", gcp_project="contract", pubsub_topic=f"topic-{name}", pubsub_subscription=f"sub-{name}",
        ack_deadline_seconds=10, publish_timeout_seconds=5,
    )
    provision_pubsub(base)

    def make(**overrides) -> Broker:
        return PubSubBroker(base.model_copy(update=overrides))

    return BrokerBackend("pubsub", make, enforces_ordering=False, min_ack_deadline=10.0)


BACKENDS = {"local": _local_backend, "pubsub": _pubsub_backend}


@pytest.fixture(params=["local", pytest.param("pubsub", marks=pytest.mark.emulator)])
def broker_backend(request, tmp_path) -> Iterator[BrokerBackend]:
    made: list[Broker] = []
    backend = BACKENDS[request.param](request, tmp_path)
    factory = backend.make

    def make(**overrides) -> Broker:
        new_broker = factory(**overrides)
        made.append(new_broker)
        return new_broker

    backend.make = make
    yield backend
    for made_broker in made:
        made_broker.close()
