"""The in-memory broker's own promises beyond the contract suite (tests/broker/test_contract.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from app.broker.base import PORTABLE_LIMITS, OutgoingMessage
from tests.support.memory_broker import MemoryBroker


def test_a_message_over_the_limits_fails_the_whole_publish():
    broker = MemoryBroker(limits=dataclasses.replace(PORTABLE_LIMITS, max_attribute_value_bytes=8))
    fits = OutgoingMessage(b"a", "t", {"dedup_id": "short"})
    too_long = OutgoingMessage(b"b", "t", {"dedup_id": "longer than eight"})
    with pytest.raises(ValueError, match="limits"):
        asyncio.run(broker.publish([fits, too_long, fits], batch_id="b"))
    assert broker.unacked == 0


def test_put_activities_keeps_to_the_broker_s_limits():
    from app.schema.activity import Activity

    small = MemoryBroker(limits=dataclasses.replace(PORTABLE_LIMITS, max_message_bytes=2000))
    rows = [Activity("insert", "t", ["s"], ["string"], ["x" * 400]) for _ in range(10)]
    assert len(small.put_activities(*rows)) > 1
    assert len(MemoryBroker().put_activities(*rows)) == 1
