"""Receipts on the Google path: API -> Pub/Sub (pstest) -> subscriber -> BigQuery (bqemulator).

The API and the subscriber run with separate data folders, as on separate hosts, and
`python -m app batch` with a third: the receipt can only come from `_ingest_receipts` in
the dataset. The scenario of `receipt_cases`.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from app.keys import new_key, write_keys_file
from tests.support.bqemulator import shared_emulator
from tests.e2e.receipt_cases import mixed_batch_settles_per_table
from tests.support.processes import ROOT, Pipeline
from tests.support.pstest import running_pstest

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


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
    mixed_batch_settles_per_table(pipeline, auth, other_auth, timeout=120)
    assert not (tmp_path / "laptop").exists()  # `python -m app batch` read the dataset
    assert not any((tmp_path / host / "receipts.sqlite").exists() for host in ("api-host", "subscriber-host"))
