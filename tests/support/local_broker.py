"""Helpers and fixtures for the local broker's tests (tests/broker/test_local*.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from app.broker.base import OutgoingMessage
from app.broker.local import LocalBroker
from app.settings import Settings


def msg(data: str, key: str = "t", **attributes: str) -> OutgoingMessage:
    return OutgoingMessage(data=data.encode(), ordering_key=key, attributes={"dedup_id": data, **attributes})


def publish(broker: LocalBroker, *messages: OutgoingMessage, batch_id: str = "b", **kw):
    return asyncio.run(broker.publish(list(messages), batch_id=batch_id, **kw))


def datas(messages) -> list[str]:
    return [m.data.decode() for m in messages]


def count_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def make_broker(tmp_path):
    """LocalBroker factory over one file in tmp_path; every broker made is closed after the test."""
    brokers: list[LocalBroker] = []

    def make(**overrides) -> LocalBroker:
        overrides.setdefault("ack_deadline_seconds", 30.0)
        broker = LocalBroker(Settings(data_dir=tmp_path, **overrides))
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def broker(make_broker) -> LocalBroker:
    return make_broker()
