"""Receipts and scoped keys across the real processes (local broker, DuckDB): POST, apply, GET.

A mixed batch over two tables, one activity of which conflicts with its table's type:
the receipt settles to `applied` for one table and `dead_lettered` (with the reason) for
the other; the dead letter names the key; another key gets 404; `python -m app batch`
prints the same receipt.
"""

from __future__ import annotations

import json

import httpx
import pytest

from app.keys import new_key, write_keys_file
from tests.support.processes import Pipeline, wait_until


def _activity(table, names, types, values):
    return {"operation": "insert", "table": table, "col_names": names, "col_types": types, "col_values": values}


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
    first = pipeline.post({"user_activities": [_activity("orders", ["id"], ["integer"], [1])]}, headers=auth)
    assert first.status_code == 200, first.text
    r = pipeline.post({"user_activities": [
        _activity("orders", ["id"], ["integer"], [2]),
        _activity("orders", ["id"], ["string"], ["not a number"]),  # type conflict -> dead letter
        _activity("orders_eu", ["id"], ["integer"], [3]),
    ]}, headers=auth)
    assert r.status_code == 200, r.text
    url = pipeline.api_url + r.json()["receipt"]

    def settled():
        body = httpx.get(url, headers=auth, timeout=10).json()
        return body if body["state"] != "accepted" else None

    body = wait_until(settled, what="the receipt to settle")
    assert body["key_id"] == "orders-backend" and body["state"] == "dead_lettered"
    orders, orders_eu = body["tables"]
    assert (orders["table"], orders["state"], orders["rows_applied"], orders["rows_dead_lettered"]) == (
        "orders", "dead_lettered", 1, 1)
    assert orders["reason"] and orders["settled_at"]
    assert (orders_eu["table"], orders_eu["state"], orders_eu["rows_applied"]) == ("orders_eu", "applied", 1)

    assert httpx.get(url, headers=other_auth, timeout=10).status_code == 404
    unknown = pipeline.api_url + "/api-log/v1/batches/" + "0" * 32
    assert httpx.get(unknown, headers=auth, timeout=10).status_code == 404

    printed = pipeline.cli("batch", r.json()["batch_id"])
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == body
    assert pipeline.cli("batch", "0" * 32).returncode == 1

    letters = [json.loads(line) for line in pipeline.cli("dead-letters", "list", "--json").stdout.splitlines()]
    assert [(e["table"], e["key_id"]) for e in letters] == [("orders", "orders-backend")]
