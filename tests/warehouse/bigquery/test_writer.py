"""Rows through the Storage Write API or insertAll: streams, request sizes, refused rows (app/warehouse/bigquery/writer.py).

Over the wire against bqemulator unless a test says otherwise (fixtures in conftest.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from typing import Any
from decimal import Decimal

import pyarrow as pa
import pytest

from app.schema.columnar import runs_of
from app.warehouse.base import Envelope, TransientWarehouseError
from app.warehouse.bigquery import MARKERS_TABLE, BigQueryWarehouse
from app.warehouse.bigquery.errors import SchemaPendingError
from app.warehouse.bigquery.writer import insert_id, split_rows


from tests.support.builders import dele, env, ins
from tests.warehouse.bigquery.support import ids


@pytest.mark.parametrize("columnar", [False, True], ids=["v1", "v2"])
def test_insert_all_fallback(settings, columnar: bool) -> None:
    w = BigQueryWarehouse(settings.model_copy(update={"bigquery_insert_mode": "insert_all"}))
    try:
        t = "legacy_v2" if columnar else "legacy"
        cols = [
            ("id", "integer"),
            ("f", "float"),
            ("n", "numeric"),
            ("ts", "timestamp"),
            ("r", "record"),
            ("g", "geography"),
        ]
        e = env(
            t,
            ins(t, cols, [1, "NaN", "1.5", "2024-01-02T03:04:05.000006Z", {"a": [1]}, "POINT(1 2)"]),
            ins(t, cols, [2, 2.5, None, None, None, None]),
        )
        if columnar:  # a v2 message: the legacy path materializes the values itself
            e = Envelope(e.dedup_id, t, runs=runs_of(e.activities))
        r = w.apply(t, [e])
        assert r.rows_inserted == 2 and r.rejections == []
        assert w.apply(t, [e]).skipped_duplicates == 1
        assert not w.client.has_write_client  # no Storage Write client was needed
        _, rows = w.query(
            f"SELECT id, IS_NAN(f), n, ts, TO_JSON_STRING(r), ST_ASTEXT(g) FROM `{w.dataset}.{t}` ORDER BY id"
        )
        assert (
            rows[0][:3] == (1, True, Decimal("1.5"))
            and rows[0][4] == '{"a":[1]}'
            and rows[0][5].replace(" ", "") == "POINT(12)"
        )
        assert rows[0][3] == dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
        assert rows[1][:2] == (2, False)
        assert w.apply(t, [env(t, dele(t, [("id", "integer")], [2]))]).rows_deleted == 1
        assert ids(w, t) == [1]
    finally:
        w.close()


def test_markers_connection_is_reused_and_each_apply_commits_a_pending_stream_of_its_own(wh) -> None:
    t = "conn"
    cols = [("id", "integer")]
    wh.apply(t, [env(t, ins(t, cols, [0]))])
    opened, created = wh.writer.pool.opened, wh.writer.streams_created
    for n in range(1, 4):
        wh.apply(t, [env(t, ins(t, cols, [n]))])
    assert wh.writer.streams_created - created == 3  # one PENDING stream per apply of the table
    assert wh.writer.pool.opened - opened == 3  # the markers' default-stream connection is reused
    assert wh.writer.open_streams == 1  # a pending stream's connection closes with its commit
    assert ids(wh, t) == [0, 1, 2, 3]


def test_opening_a_connection_waits_in_short_steps_not_the_clients_80_ms(wh, monkeypatch) -> None:
    """Every table's apply opens a connection (its PENDING stream); the pinned client sleeps
    in steps of `_WRITE_OPEN_INTERVAL` until the call is up (80 ms unless we set it)."""
    import inspect
    import time

    from google.cloud.bigquery_storage_v1 import writer as storage_writer

    from app.warehouse.bigquery.writer import OPEN_POLL_SECONDS

    assert "_WRITE_OPEN_INTERVAL" in storage_writer._Connection._open.__code__.co_names  # still how it waits
    real_sleep = time.sleep
    open_steps: list[float] = []

    def sleep(seconds: float) -> None:
        if inspect.currentframe().f_back.f_globals is vars(storage_writer):  # type: ignore[union-attr]
            open_steps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    t = "open_steps"
    for n in range(3):
        wh.apply(t, [env(t, ins(t, [("id", "integer")], [n]))])
    assert set(open_steps) <= {OPEN_POLL_SECONDS} and OPEN_POLL_SECONDS < 0.08
    assert ids(wh, t) == [0, 1, 2]


def stream_name(wh: BigQueryWarehouse, table: str) -> str:
    return f"projects/{wh.project}/datasets/{wh.dataset}/tables/{table}/streams/_default"


@pytest.mark.parametrize("columnar", [False, True], ids=["v1", "v2"])
def test_row_too_big_for_any_request_is_rejected_alone(wh, monkeypatch, columnar: bool) -> None:
    limit = 64 * 1024
    monkeypatch.setattr("app.warehouse.bigquery.warehouse.split_rows", functools.partial(split_rows, limit=limit))
    t = "big_v2" if columnar else "big"
    cols = [("id", "integer"), ("blob", "string")]
    e = env(t, ins(t, cols, [1, "small"]), ins(t, cols, [2, "x" * limit]), ins(t, cols, [3, "small"]))
    r = wh.apply(t, [Envelope(e.dedup_id, t, runs=runs_of(e.activities)) if columnar else e])
    assert [(j.index, j.activity) for j in r.rejections] == [(1, e.activities[1])]
    assert "exceeds" in r.rejections[0].reason
    assert r.rows_inserted == 2 and ids(wh, t) == [1, 3]


def test_requests_are_sized_with_the_writer_schema() -> None:
    wide = pa.RecordBatch.from_pydict({f"column_with_a_long_name_{i}": ["v" * 100] * 200 for i in range(50)})
    schema_bytes = len(wide.schema.serialize().to_pybytes())
    limit = 200_000
    requests, oversized = split_rows(wide, limit=limit)
    assert oversized == [] and sum(r.rows for r in requests) == 200 and len(requests) > 1
    assert all(len(r.schema) == schema_bytes and len(r.schema) + len(r.batch) <= limit for r in requests)
    _, oversized = split_rows(pa.RecordBatch.from_pydict({"a": ["x" * 10_000]}), limit=5_000)
    assert [row for row, _ in oversized] == [0]


def test_insert_ids_fit_the_128_character_limit() -> None:
    long_id = "b" * 32 + ":" + "t" * 1024 + ":7"
    assert len(insert_id(long_id, 12345)) <= 128
    assert insert_id(long_id, 1) == insert_id(long_id, 1) != insert_id(long_id, 2)


def test_new_column_pending_in_the_write_stream_holds_only_that_table(wh, monkeypatch) -> None:
    a, b = "pending_a", "pending_b"
    wh.apply(a, [env(a, ins(a, [("id", "integer")], [0]))])
    real_stage = wh.writer.stage
    refused = {"n": 0}

    def stage(parent: str, table: str, requests: list) -> Any:
        if table == a and refused["n"] == 0:
            real_stage(parent, table, requests)  # written to its stream, but the answer says "not yet"
            refused["n"] += 1
            raise SchemaPendingError("BigQuery AppendRows: extra fields: 'note'", retry_after=30.0)
        return real_stage(parent, table, requests)

    monkeypatch.setattr(wh.writer, "stage", stage)
    e = env(a, ins(a, [("id", "integer"), ("note", "string")], [1, "n"]))
    with pytest.raises(TransientWarehouseError) as raised:
        wh.apply(a, [e])
    assert raised.value.retry_after == 30.0
    assert wh.apply(b, [env(b, ins(b, [("id", "integer")], [7]))]).rows_inserted == 1  # the other table goes on
    r = wh.apply(a, [e])  # later: written once, the half-written attempt cleaned up
    assert r.applied_envelopes == 1 and ids(wh, a) == [0, 1]


@pytest.mark.parametrize("columnar", [False, True], ids=["v1", "v2"])
def test_rows_refused_by_append_rows_are_rejected_alone(wh, monkeypatch, columnar: bool) -> None:
    import grpc
    from google.api_core import exceptions as gexc
    from google.cloud.bigquery_storage_v1 import types as storage_types
    from google.rpc import status_pb2

    from app.warehouse.bigquery import errors

    t = "refused_v2" if columnar else "refused"
    cols = [("id", "integer"), ("g", "geography")]
    wh.apply(t, [env(t, ins(t, cols, [0, "POINT(0 0)"]))])
    real_stage = wh.writer.stage
    calls = {"n": 0}

    def stage(parent: str, table: str, requests: list) -> Any:
        if table == t and calls["n"] == 0:
            calls["n"] += 1
            # what AppendRowsStream raises for a request whose row 1 BigQuery refused
            response = storage_types.AppendRowsResponse(
                error=status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="Rows are invalid"),
                row_errors=[
                    storage_types.RowError(
                        index=1, code=storage_types.RowError.RowErrorCode.FIELDS_ERROR, message="bad geography"
                    )
                ],
            )
            exc = gexc.from_grpc_status(response.error.code, response.error.message, response=response)
            raise errors.translate(exc, "AppendRows") from exc
        return real_stage(parent, table, requests)

    monkeypatch.setattr(wh.writer, "stage", stage)
    e = env(t, ins(t, cols, [1, "POINT(1 1)"]), ins(t, cols, [2, "POINT(2 2)"]), ins(t, cols, [3, "POINT(3 3)"]))
    r = wh.apply(t, [Envelope(e.dedup_id, t, runs=runs_of(e.activities)) if columnar else e])
    assert [(j.index, j.activity) for j in r.rejections] == [(1, e.activities[1])]
    assert "bad geography" in r.rejections[0].reason
    assert r.applied_envelopes == 1 and r.rows_inserted == 2
    assert ids(wh, t) == [0, 1, 3]


def test_tables_apply_concurrently_sharing_the_markers_connection(wh) -> None:
    tables = [f"conc_{i}" for i in range(4)]
    failures: list[BaseException] = []

    def run(t: str) -> None:
        try:
            for n in range(5):
                r = wh.apply(t, [env(t, ins(t, [("id", "integer")], [n]))])
                assert r.applied_envelopes == 1
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in tables]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert failures == []
    for t in tables:
        assert ids(wh, t) == [0, 1, 2, 3, 4]
    _, rows = wh.query(f"SELECT state, COUNT(*) FROM `{wh.dataset}.{MARKERS_TABLE}` GROUP BY state ORDER BY state")
    assert rows == [("done", 20), ("intent", 20)]


def _apply_until_done(wh: BigQueryWarehouse, table: str, envelopes: list[Envelope]) -> int:
    """Retry transient failures as the subscriber does; how many failed."""
    for failed in range(50):
        try:
            wh.apply(table, envelopes)
            return failed
        except TransientWarehouseError:
            continue
    pytest.fail("the apply never succeeded")


def test_a_commit_whose_answer_is_lost_and_that_lands_later_adds_its_rows_once(settings) -> None:
    """Issue 16, appends exactly once: a BatchCommitWriteStreams past our deadline may
    still be applied. Without settling it, the retry's clean-up ran before it landed and
    its rows came in a second time, next to the retry's."""
    from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES
    from tests.support.fault_proxy import GrpcProxy, SchemaVisibility, StorageWriteFaults
    from tests.support.processes import wait_until

    faults = StorageWriteFaults(SchemaVisibility())
    t = "late_commit"
    cols = [("id", "integer")]
    with GrpcProxy(settings.bigquery_emulator_grpc_host, storage_write=faults) as proxy:
        through = settings.model_copy(
            update={"bigquery_emulator_grpc_host": proxy.address, "bigquery_write_timeout_seconds": 1.0}
        )
        wh = BigQueryWarehouse(through, type_overrides=EMULATOR_TYPE_OVERRIDES)
        try:
            wh.apply(t, [env(t, ins(t, cols, [0]))])
            # every commit try (the client library's own retries, ours) held past our deadline
            faults.commits.hold(t, seconds=3.0, window=2.5)
            # our deadline holds (the library alone would retry the commit for 600 s) ...
            assert _apply_until_done(wh, t, [env(t, ins(t, cols, [1]), ins(t, cols, [2]))]) > 0
            wait_until(lambda: faults.commits.held and not faults.commits.holding, timeout=60, interval=0.1,
                       what="the held commits to land")  # fmt: skip
            # ... and the held commits, landed after the apply, added nothing
            assert ids(wh, t) == [0, 1, 2]
        finally:
            wh.close()
