"""BigQueryClient and ensure_dataset (app/warehouse/bigquery/client.py).

Over the wire against bqemulator unless a test says otherwise (fixtures in conftest.py).
"""

from __future__ import annotations

from typing import Any


from app.settings import Settings
from app.warehouse.bigquery import BigQueryClient, BigQueryWarehouse, ensure_dataset


from tests.support.builders import env, ins
from tests.warehouse.bigquery.support import ids


def test_ensure_dataset_is_idempotent(settings) -> None:
    ensure_dataset(settings)
    ensure_dataset(settings)
    w = BigQueryWarehouse(settings)
    try:
        assert w.ready() == (True, "ok")
    finally:
        w.close()


def test_dataset_created_in_the_configured_location(settings) -> None:
    located = settings.model_copy(update={"bigquery_location": "EU"})
    assert ensure_dataset(located) is True
    assert ensure_dataset(located) is False
    w = BigQueryWarehouse(located)
    try:
        assert w.client.rest.get_dataset(f"{w.project}.{w.dataset}").location == "EU"
        w.apply("loc", [env("loc", ins("loc", [("id", "integer")], [1]))])  # query jobs run there too
        assert ids(w, "loc") == [1]
    finally:
        w.close()


class _RowsWithStatistics(list):
    total_bytes_processed = 10_485_760
    num_dml_affected_rows = None
    schema: list = []


class _RestClientDouble:
    """Stands in for google.cloud.bigquery.Client where only query statistics matter."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def query_and_wait(self, sql: str, **kwargs: Any) -> _RowsWithStatistics:
        self.calls.append(kwargs)
        return _RowsWithStatistics()

    def close(self) -> None:
        pass


def test_client_counts_calls_and_bytes_processed_per_kind() -> None:
    rest = _RestClientDouble()
    client = BigQueryClient(Settings(warehouse="bigquery", gcp_project="my-project", bigquery_location="EU"), rest=rest)  # type: ignore[arg-type]
    client.query("SELECT 1", None, "query", "probe")
    client.query("DELETE FROM t WHERE true", None, "dml", "delete")
    client.query("SELECT 2", None, "query", "probe")
    assert client.calls == {"query": 2, "dml": 1}
    assert client.bytes_processed == {"query": 2 * 10_485_760, "dml": 10_485_760}
    assert {c["location"] for c in rest.calls} == {"EU"}
    assert all(c["job_retry"] is not None and c["wait_timeout"] for c in rest.calls)  # bounded, not unbounded


def test_a_job_is_retried_for_a_failed_job_not_for_a_transport_error_already_retried_in_the_call():
    from google.api_core import exceptions as gexc

    from app.warehouse.bigquery.client import JOB_RETRY

    predicate = JOB_RETRY._predicate
    assert predicate(gexc.InternalServerError("job failed", errors=[{"reason": "jobInternalError"}]))
    assert predicate(gexc.Forbidden("slow down", errors=[{"reason": "rateLimitExceeded"}]))
    assert not predicate(gexc.RetryError("10 s of connection errors", ConnectionError("refused")))
    assert not predicate(gexc.BadRequest("bad", errors=[{"reason": "invalidQuery"}]))
