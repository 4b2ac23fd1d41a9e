"""DML exactly once when a job runs after the client stopped waiting for it (issue 16,
"A DML job that takes longer than the client waits, then runs").

A fault proxy in front of the shared emulator proxy holds one DELETE job: accepted at
once, run on the emulator only seconds later, cancel ignored. The warehouse's wait is cut
short, so its apply fails as transient while the job is still queued; it is retried as
the subscriber would retry it.
"""

from __future__ import annotations

import time

import pytest

from app.warehouse.base import TransientWarehouseError
from app.warehouse.bigquery import BigQueryWarehouse
from app.warehouse.bigquery import client as bq_client
from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES
from tests.support.builders import dele, env, ins
from tests.support.fault_proxy import BigQueryRestProxy
from tests.warehouse.bigquery.support import ids

HOLD_SECONDS = 3.0  # the job's queueing; the client waits far less (CLIENT_WAIT_SECONDS)
CLIENT_WAIT_SECONDS = 0.3
RETRIES = 200


def _apply_until_done(wh: BigQueryWarehouse, table: str, envelopes) -> list[str]:
    """Retry transient failures as the subscriber does; the errors seen."""
    seen: list[str] = []
    for _ in range(RETRIES):
        try:
            wh.apply(table, envelopes)
            return seen
        except TransientWarehouseError as exc:
            seen.append(str(exc))
            time.sleep(0.1)
    pytest.fail(f"apply never succeeded: {seen[-3:]}")


def test_a_dml_job_that_runs_after_the_client_stopped_waiting_is_waited_for_not_raced(settings, monkeypatch) -> None:
    monkeypatch.setattr(bq_client, "JOB_TIMEOUT_SECONDS", CLIENT_WAIT_SECONDS)
    t = "late"
    cols = [("id", "integer"), ("name", "string")]
    with BigQueryRestProxy(settings.bigquery_emulator_host) as faults:
        through_faults = settings.model_copy(update={"bigquery_emulator_host": faults.address})
        wh = BigQueryWarehouse(through_faults, type_overrides=EMULATOR_TYPE_OVERRIDES)
        try:
            wh.apply(t, [env(t, ins(t, cols, [1, "old"]), ins(t, cols, [2, "keep"]))])
            faults.late_jobs.hold(r"^\s*DELETE\b(?!.*_ingest_dedup_id IN UNNEST)", seconds=HOLD_SECONDS)
            # the delete of "old", then a new row named "old": the late DELETE must not take it
            batch = [env(t, dele(t, [("name", "string")], ["old"])), env(t, ins(t, cols, [3, "old"]))]
            errors = _apply_until_done(wh, t, batch)
            assert errors  # the client stopped waiting for the DELETE at least once
            for _ in range(RETRIES):  # (only without the fix can the job still be queued here)
                if not faults.late_jobs.waiting:
                    break
                time.sleep(0.1)
            assert ids(wh, t) == [2, 3]  # every accepted row exactly once; "old" 1 deleted, 3 kept
            # redelivered: nothing written twice
            wh.apply(t, batch)
            assert ids(wh, t) == [2, 3]
        finally:
            wh.close()
