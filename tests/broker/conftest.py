"""Fixtures for the broker tests: a session-wide Pub/Sub emulator (Google's pstest) and the
backends the contract suite runs against."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from app.broker import make_broker as open_broker
from app.broker.base import Broker
from app.provision import provision_pubsub
from app.settings import Settings
from tests.support import memory_broker  # noqa: F401  (registers BROKER=memory)
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


@pytest.fixture(scope="session")
def gated_pubsub(pubsub_emulator) -> Iterator[str]:
    """host:port of the Google-behaviour layer (`OrderingGate`) in front of pstest: pstest
    sends one message per StreamingPull response and enforces no ordering; Google batches
    a key's messages in order."""
    from tests.support.fault_proxy import GrpcProxy, OrderingGate

    gate = OrderingGate()
    try:
        with GrpcProxy(pubsub_emulator, pubsub=gate) as proxy:
            yield proxy.address
    finally:
        gate.close()


# --------------------------------------------------------------------------- contract suite
# test_contract.py runs against every entry of BACKENDS, each opened through the
# registry. A backend is a factory of brokers that share one stream (so a second broker
# is "another replica" or "after a restart"). What a backend takes and promises the
# tests read from `broker.capabilities`. Pub/Sub runs as pstest behind the Google-behaviour
# layer (`gated_pubsub`), which enforces ordering; `enforces_ordering` says whether per-key
# order is asserted for the backend at hand. `counts_attempts`: whether delivery attempts
# are counted for messages the test nacks.


@dataclass
class BrokerBackend:
    name: str
    make: Callable[..., Broker]  # make(**settings overrides) -> a broker on the shared stream
    enforces_ordering: bool
    counts_attempts: bool = True


def _local_backend(request, tmp_path) -> BrokerBackend:
    def make(**overrides) -> Broker:
        return open_broker(Settings(broker="local", data_dir=tmp_path, **overrides))

    return BrokerBackend("local", make, enforces_ordering=True)


def _memory_backend(request, tmp_path) -> BrokerBackend:
    def make(**overrides) -> Broker:
        return open_broker(Settings(broker="memory", data_dir=tmp_path, **overrides))

    return BrokerBackend("memory", make, enforces_ordering=True)


def _pubsub_backend(request, tmp_path) -> BrokerBackend:
    request.getfixturevalue("monkeypatch").setenv("PUBSUB_EMULATOR_HOST", request.getfixturevalue("gated_pubsub"))
    name = uuid.uuid4().hex[:8]
    base = Settings(
        broker="pubsub", gcp_project="contract", pubsub_topic=f"topic-{name}", pubsub_subscription=f"sub-{name}",
        ack_deadline_seconds=10, publish_timeout_seconds=5,
    )
    provision_pubsub(base)

    def make(**overrides) -> Broker:
        return open_broker(base.model_copy(update=overrides))

    return BrokerBackend("pubsub", make, enforces_ordering=True, counts_attempts=False)


BACKENDS = {"local": _local_backend, "memory": _memory_backend, "pubsub": _pubsub_backend}


@pytest.fixture(params=["local", "memory", pytest.param("pubsub", marks=pytest.mark.emulator)])
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
