"""Brokers by name: `Settings.broker` accepts what is registered, `make_broker` opens it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from pydantic import ValidationError

from app.broker import make_broker
from app.broker.base import PORTABLE_LIMITS
from app.broker.local import LocalBroker
from app.broker import registry
from app.broker.registry import names, register
from app.settings import Settings
from tests.support.memory_broker import MemoryBroker
from tests.support.local_broker import msg


def test_an_unknown_broker_is_refused_naming_the_known_ones():
    with pytest.raises(ValidationError, match="unknown broker 'kafka'; registered: .*local.*memory.*pubsub"):
        Settings(broker="kafka")


def test_the_default_broker_is_the_local_file(tmp_path):
    broker = make_broker(Settings(data_dir=tmp_path))
    try:
        assert isinstance(broker, LocalBroker) and broker.name == "local"
    finally:
        broker.close()


def test_a_registered_broker_is_opened_by_name_on_its_stream(tmp_path):
    settings = Settings(broker="memory", data_dir=tmp_path)
    first, second = make_broker(settings), make_broker(settings)
    assert isinstance(first, MemoryBroker) and first.name == "memory"
    asyncio.run(first.publish([msg("x")], batch_id="b"))
    assert [m.data for m in second.pull(10, 1.0)] == [b"x"]


def test_registering_a_name_makes_it_a_valid_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_openers", dict(registry._openers))  # forgotten after the test
    opened = []
    register("recorded", lambda settings: opened.append(settings) or MemoryBroker(settings))
    settings = Settings(broker="recorded", data_dir=tmp_path)
    assert "recorded" in names() and make_broker(settings).name == "recorded" and opened == [settings]


@pytest.mark.parametrize("name", ["local", "pubsub", "memory"])
def test_every_registered_broker_takes_the_portable_limits(tmp_path, name):
    broker = make_broker(Settings(broker=name, data_dir=tmp_path))  # opening connects nowhere yet
    try:
        limits = broker.capabilities.message
        assert all(
            getattr(limits, f.name) >= getattr(PORTABLE_LIMITS, f.name) for f in dataclasses.fields(PORTABLE_LIMITS)
        )
    finally:
        broker.close()
