"""The receipts scenario both paths run end to end (test_receipts.py, test_receipts_gcp.py).

A mixed batch over two tables, one activity of which conflicts with its table's type:
the receipt settles to `applied` for one table and `dead_lettered` (with the reason) for
the other; another key gets 404, an unknown id 404; `python -m app batch` prints the same.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.processes import Pipeline, wait_until


def activity(table: str, names: list[str], types: list[str], values: list[Any]) -> dict[str, Any]:
    return {"operation": "insert", "table": table, "col_names": names, "col_types": types, "col_values": values}


def mixed_batch_settles_per_table(pipeline: Pipeline, auth: dict, other_auth: dict, timeout: float = 30) -> dict:
    """Runs the scenario; the settled receipt."""
    first = pipeline.post({"user_activities": [activity("orders", ["id"], ["integer"], [1])]}, headers=auth)
    assert first.status_code == 200, first.text
    r = pipeline.post({"user_activities": [
        activity("orders", ["id"], ["integer"], [2]),
        activity("orders", ["id"], ["string"], ["not a number"]),  # type conflict -> dead letter
        activity("orders_eu", ["id"], ["integer"], [3]),
    ]}, headers=auth)
    assert r.status_code == 200, r.text
    url = pipeline.api_url + r.json()["receipt"]
    assert [t["table"] for t in httpx.get(url, headers=auth, timeout=30).json()["tables"]] == ["orders", "orders_eu"]

    def settled():
        body = httpx.get(url, headers=auth, timeout=30).json()
        return body if body["state"] != "accepted" else None

    body = wait_until(settled, timeout=timeout, interval=0.2, what="the receipt to settle")
    assert body["key_id"] == "orders-backend" and body["state"] == "dead_lettered"
    orders, orders_eu = body["tables"]
    assert (orders["table"], orders["state"], orders["rows_applied"], orders["rows_dead_lettered"]) == (
        "orders", "dead_lettered", 1, 1)
    assert orders["reason"] and orders["settled_at"]
    assert (orders_eu["table"], orders_eu["state"], orders_eu["rows_applied"]) == ("orders_eu", "applied", 1)

    assert httpx.get(url, headers=other_auth, timeout=30).status_code == 404
    unknown = pipeline.api_url + "/api-log/v1/batches/" + "0" * 32
    assert httpx.get(unknown, headers=auth, timeout=30).status_code == 404

    printed = pipeline.cli("batch", r.json()["batch_id"])
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == body
    assert pipeline.cli("batch", "0" * 32).returncode == 1
    return body
