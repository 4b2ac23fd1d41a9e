"""The API encodes within the limits of the broker it publishes to (`broker.capabilities`)."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.broker.base import PORTABLE_LIMITS
from app.messages.codec import decode_message
from app.settings import Settings
from tests.support.memory_broker import MemoryBroker


def _body(rows: int) -> dict:
    return {"user_activities": [
        {"operation": "insert", "table": "t", "col_names": ["n", "s"], "col_types": ["integer", "string"],
         "col_values": [n, "x" * 500]}
        for n in range(rows)
    ]}


@pytest.mark.parametrize("rows", [4, 40])  # format 1 (a small request) and format 2
def test_a_request_is_cut_to_the_broker_s_message_size(tmp_path, rows):
    broker = MemoryBroker(limits=dataclasses.replace(PORTABLE_LIMITS, max_message_bytes=1500))
    with TestClient(create_app(Settings(data_dir=tmp_path), broker=broker)) as client:
        assert client.post("/api-log/v1/", json=_body(rows)).status_code == 200
    messages = broker.pull(1000, 0.1)
    assert len(messages) > 1 and all(len(m.data) <= 1500 for m in messages)
    assert [a.col_values[0] for m in messages for a in decode_message(m).activities] == list(range(rows))
