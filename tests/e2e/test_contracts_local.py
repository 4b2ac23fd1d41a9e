"""Tables under contract end to end on the local path: API -> local broker -> subscriber -> DuckDB.

One API + subscriber pair serves every case of `contract_cases.CASES` (each case uses
tables of its own and rewrites the tables file, which both processes reload).
"""

from __future__ import annotations

import pytest

from tests.e2e.contract_cases import CASES, ContractRunner, contract_env
from tests.support.processes import Pipeline


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contracts-local")
    env, secret = contract_env(tmp)
    p = Pipeline.create(tmp, **env)
    p.start("subscriber")
    p.start("api")
    try:
        yield ContractRunner(p, tmp / "tables.toml", secret, qualify=lambda table: table)
    finally:
        p.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract_case_end_to_end(runner, case):
    runner.run(case)
