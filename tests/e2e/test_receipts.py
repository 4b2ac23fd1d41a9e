"""Receipts and scoped keys across the real processes (local broker, DuckDB): POST, apply, GET.

The scenario of `receipt_cases`, and the dead letter names the key.
"""

from __future__ import annotations

import json

import pytest

from app.keys import new_key, write_keys_file
from tests.e2e.receipt_cases import mixed_batch_settles_per_table
from tests.support.processes import Pipeline


@pytest.fixture
def keyed(tmp_path):
    orders, orders_secret = new_key("orders-backend", ["orders*"], ["insert"])
    other, other_secret = new_key("other", ["*"], ["insert"])
    write_keys_file(tmp_path / "keys.toml", [orders, other])
    p = Pipeline.create(tmp_path, API_KEYS_FILE=str(tmp_path / "keys.toml"))
    p.start("subscriber")
    p.start("api")
    yield p, {"Authorization": f"Bearer {orders_secret}"}, {"Authorization": f"Bearer {other_secret}"}
    p.stop()


def test_receipt_of_a_mixed_batch_with_a_type_conflict(keyed):
    pipeline, auth, other_auth = keyed
    mixed_batch_settles_per_table(pipeline, auth, other_auth)

    letters = [json.loads(line) for line in pipeline.cli("dead-letters", "list", "--json").stdout.splitlines()]
    assert [(e["table"], e["key_id"]) for e in letters] == [("orders", "orders-backend")]
