"""End to end over the wire on the Google Cloud path:
API -> Pub/Sub (pstest) -> subscriber -> BigQuery (bqemulator), and the mixed setups.

pstest delivers slowly (tens of messages per second), so these tests send few messages.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.support.bqemulator import shared_emulator
from tests.support.processes import ROOT, Pipeline, wait_until
from tests.support.pstest import running_pstest

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


@pytest.fixture(scope="module")
def pstest_host():
    with running_pstest() as address:
        yield address


def _env(mode_broker: str, mode_warehouse: str, pstest_host: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    env = {
        "BROKER": mode_broker,
        "WAREHOUSE": mode_warehouse,
        "PUBSUB_TOPIC": f"activities-{suffix}",
        "PUBSUB_SUBSCRIPTION": f"activities-sub-{suffix}",
        "PUBSUB_EMULATOR_HOST": pstest_host,
        "ACK_DEADLINE_SECONDS": "10",
    }
    if mode_warehouse == "bigquery":
        emu = shared_emulator()
        env |= {
            "GCP_PROJECT": emu.project,
            "BIGQUERY_DATASET": f"ds_{suffix}",
            "BIGQUERY_EMULATOR_HOST": emu.rest,
            "BIGQUERY_EMULATOR_GRPC_HOST": emu.grpc,
        }
    else:
        env |= {"GCP_PROJECT": "e2e-project", "PROVISION_BIGQUERY": "false"}
    return env


def _provision(p: Pipeline) -> None:
    # The same script users run, against the emulators.
    out = subprocess.run(["bash", str(ROOT / "pubsub.sh")], cwd=ROOT, env=p.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _activity(op, table, names, types, values):
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def _rows(p: Pipeline, warehouse: str, sql_table: str, columns: str, order: str) -> list[tuple]:
    if warehouse == "bigquery":
        sql_table = f"{p.env['BIGQUERY_DATASET']}.{sql_table}"
    return p.query(f"SELECT {columns} FROM {sql_table} ORDER BY {order}")


@pytest.mark.parametrize(
    "broker, warehouse",
    [("pubsub", "bigquery"), ("pubsub", "duckdb"), ("local", "bigquery")],
)
def test_insert_then_immediate_delete_over_the_wire(tmp_path, pstest_host, broker, warehouse):
    p = Pipeline.create(tmp_path, **_env(broker, warehouse, pstest_host))
    if broker == "pubsub" or warehouse == "bigquery":
        if broker == "local":
            p.env["PROVISION_PUBSUB"] = "false"
        _provision(p)
    p.start("subscriber")
    p.start("api")
    try:
        t = "orders"
        r = p.post({"user_activities": [
            _activity("insert", t, ["id", "amount", "placed_at"], ["integer", "numeric", "timestamp"], [1, "10.50", "2024-02-29T12:00:00+02:00"]),
            _activity("insert", t, ["id", "amount", "placed_at"], ["integer", "numeric", "timestamp"], [2, "3", None]),
        ]})
        assert r.status_code == 200, r.text
        # The delete is sent right after its insert was accepted, not 90 minutes later.
        r = p.post({"user_activities": [_activity("delete", t, ["id"], ["integer"], [1])]})
        assert r.status_code == 200, r.text
        r = p.post({"user_activities": [_activity("insert", t, ["id", "note"], ["integer", "string"], [3, "new column"])]})
        assert r.status_code == 200, r.text

        def landed():
            rows = _rows(p, warehouse, t, "id, note", "id")
            return rows if [r[0] for r in rows] == [2, 3] else None

        rows = wait_until(landed, timeout=120, interval=0.5, what="insert, delete and schema change applied")
        assert rows == [(2, None), (3, "new column")]
        cast = "CAST(amount AS STRING)" if warehouse == "bigquery" else "CAST(amount AS VARCHAR)"
        amounts = [row[0] for row in _rows(p, warehouse, t, cast, "id")]
        assert amounts[1] is None and amounts[0] is not None
        assert float(amounts[0]) == 3.0
    finally:
        p.stop()
