"""Tables under contract end to end on the Google path:
API -> Pub/Sub (pstest) -> subscriber -> BigQuery (bqemulator behind the Google-faithful proxies).

The same cases as the local path (`contract_cases.CASES`), on one API + subscriber pair.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.e2e.contract_cases import CASES, ContractRunner, contract_env
from tests.support.bqemulator import shared_emulator
from tests.support.processes import ROOT, Pipeline
from tests.support.pstest import running_pstest

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contracts-gcp")
    env, secret = contract_env(tmp)
    emu, suffix = shared_emulator(), uuid.uuid4().hex[:8]
    with running_pstest() as pstest_host:
        p = Pipeline.create(tmp, **env, BROKER="pubsub", WAREHOUSE="bigquery", PUBSUB_EMULATOR_HOST=pstest_host,
                            PUBSUB_TOPIC=f"contracts-{suffix}", PUBSUB_SUBSCRIPTION=f"contracts-sub-{suffix}",
                            ACK_DEADLINE_SECONDS="10", GCP_PROJECT=emu.project, BIGQUERY_DATASET=f"ds_{suffix}",
                            BIGQUERY_EMULATOR_HOST=emu.rest, BIGQUERY_EMULATOR_GRPC_HOST=emu.grpc)
        out = subprocess.run(["bash", str(ROOT / "pubsub.sh")], cwd=ROOT, env=p.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        p.start("subscriber")
        p.start("api")
        dataset = p.env["BIGQUERY_DATASET"]
        try:
            yield ContractRunner(p, tmp / "tables.toml", secret, qualify=lambda table: f"{dataset}.{table}", timeout=120)
        finally:
            p.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract_case_end_to_end(runner, case):
    runner.run(case)
