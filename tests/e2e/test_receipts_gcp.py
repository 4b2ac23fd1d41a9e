"""Receipts on the Google path: API -> Pub/Sub (pstest) -> subscriber -> BigQuery (bqemulator).

The API and the subscriber run with separate data folders, as on separate hosts, and
`python -m app batch` with a third: the receipt can only come from `_ingest_receipts` in
the dataset. A mixed batch over two tables, one activity of which conflicts with its
table's type, settles to `applied` for one table and `dead_lettered` for the other;
another key gets 404; an unknown id 404.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import httpx
import pytest

from app.keys import new_key, write_keys_file
from tests.support.bqemulator import shared_emulator
from tests.support.processes import ROOT, Pipeline, wait_until
from tests.support.pstest import running_pstest

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def _activity(table, names, types, values):
    return {"operation": "insert", "table": table, "col_names": names, "col_types": types, "col_values": values}


@pytest.fixture
def google(tmp_path):
    orders, orders_secret = new_key("orders-backend", ["orders*"], ["insert"])
    other, other_secret = new_key("other", ["*"], ["insert"])
    write_keys_file(tmp_path / "keys.toml", [orders, other])
    emu, suffix = shared_emulator(), uuid.uuid4().hex[:8]
    with running_pstest() as pstest_host:
        p = Pipeline.create(tmp_path, API_KEYS_FILE=str(tmp_path / "keys.toml"), BROKER="pubsub", WAREHOUSE="bigquery",
                            PUBSUB_EMULATOR_HOST=pstest_host, PUBSUB_TOPIC=f"receipts-{suffix}",
                            PUBSUB_SUBSCRIPTION=f"receipts-sub-{suffix}", ACK_DEADLINE_SECONDS="10",
                            GCP_PROJECT=emu.project, BIGQUERY_DATASET=f"ds_{suffix}", BIGQUERY_EMULATOR_HOST=emu.rest,
                            BIGQUERY_EMULATOR_GRPC_HOST=emu.grpc)
        out = subprocess.run(["bash", str(ROOT / "pubsub.sh")], cwd=ROOT, env=p.env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        p.env["DATA_DIR"] = str(tmp_path / "subscriber-host")
        p.start("subscriber")
        p.env["DATA_DIR"] = str(tmp_path / "api-host")
        p.start("api")
        p.env["DATA_DIR"] = str(tmp_path / "laptop")
        try:
            yield p, {"Authorization": f"Bearer {orders_secret}"}, {"Authorization": f"Bearer {other_secret}"}
        finally:
            p.stop()


def test_receipt_of_a_mixed_batch_with_a_type_conflict_from_the_dataset(google, tmp_path):
    pipeline, auth, other_auth = google
    first = pipeline.post({"user_activities": [_activity("orders", ["id"], ["integer"], [1])]}, headers=auth)
    assert first.status_code == 200, first.text
    r = pipeline.post({"user_activities": [
        _activity("orders", ["id"], ["integer"], [2]),
        _activity("orders", ["id"], ["string"], ["not a number"]),  # type conflict -> dead letter
        _activity("orders_eu", ["id"], ["integer"], [3]),
    ]}, headers=auth)
    assert r.status_code == 200, r.text
    url = pipeline.api_url + r.json()["receipt"]
    assert httpx.get(url, headers=auth, timeout=30).json()["tables"][0]["table"] == "orders"  # seen at once

    def settled():
        body = httpx.get(url, headers=auth, timeout=30).json()
        return body if body["state"] != "accepted" else None

    body = wait_until(settled, timeout=120, interval=0.5, what="the receipt to settle")
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
    assert not (tmp_path / "laptop").exists()
    assert not any((tmp_path / host / "receipts.sqlite").exists() for host in ("api-host", "subscriber-host"))
