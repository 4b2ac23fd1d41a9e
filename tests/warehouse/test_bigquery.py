"""BigQuery specifics over the wire against bqemulator (the shared contract runs in test_contract.py).

One emulator per session (tests.support.bqemulator.shared_emulator), a fresh dataset per
test. Skipped when the emulator cannot start, except with CI=true where that fails.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import uuid
from decimal import Decimal
from typing import Any, Iterator

import pyarrow as pa
import pytest
from google.cloud.bigquery import SchemaField

from app.schema.activity import Activity
from app.schema.columnar import runs_of
from app.schema.types import TYPE_NAMES, TYPES
from app.settings import Settings
from app.warehouse.base import Envelope, TransientWarehouseError
from app.warehouse.bigquery import DEDUP_COLUMN, MARKERS_TABLE, BigQueryClient, BigQueryWarehouse, ensure_dataset
from app.warehouse.bigquery.errors import SchemaPendingError
from app.warehouse.bigquery.schema import MARKER_RETENTION_DAYS
from app.warehouse.bigquery.types import COLUMN_TYPES
from app.warehouse.bigquery.writer import insert_id, split_rows


@pytest.fixture(scope="module")
def emu():
    from tests.support.bqemulator import EmulatorUnavailable, shared_emulator

    try:
        return shared_emulator()
    except EmulatorUnavailable as exc:  # CI=true: fail loudly
        pytest.fail(str(exc))


@pytest.fixture
def settings(emu, tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        warehouse="bigquery",
        gcp_project=emu.project,
        bigquery_dataset="bq_" + uuid.uuid4().hex[:12],
        bigquery_emulator_host=emu.rest,
        bigquery_emulator_grpc_host=emu.grpc,
    )


@pytest.fixture
def wh(settings) -> Iterator[BigQueryWarehouse]:
    w = BigQueryWarehouse(settings)
    yield w
    w.close()


def ins(table: str, cols: list[tuple[str, str]], values: list[Any]) -> Activity:
    return Activity("insert", table, [c for c, _ in cols], [t for _, t in cols], list(values))


def dele(table: str, cols: list[tuple[str, str]], values: list[Any]) -> Activity:
    return Activity("delete", table, [c for c, _ in cols], [t for _, t in cols], list(values))


def env(table: str, *acts: Activity, dedup_id: str | None = None, attempt: int = 1) -> Envelope:
    return Envelope(dedup_id or f"{uuid.uuid4().hex}:{table}:0", table, list(acts), attempt)


def ids(wh: BigQueryWarehouse, table: str) -> list[int]:
    _, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{table}`")
    return sorted(r[0] for r in rows)


def test_ensure_dataset_is_idempotent(settings) -> None:
    ensure_dataset(settings)
    ensure_dataset(settings)
    w = BigQueryWarehouse(settings)
    try:
        assert w.ready() == (True, "ok")
    finally:
        w.close()


def test_ready_reports_missing_dataset(wh) -> None:
    ok, reason = wh.ready()
    assert not ok and wh.dataset in reason


def test_table_created_with_type_map_and_descriptions(wh) -> None:
    cols = [(f"c_{t}", t) for t in TYPE_NAMES]
    r = wh.apply("typed", [env("typed", ins("typed", [("id", "integer"), *cols], [1] + [None] * len(cols)))])
    assert r.rejections == [] and r.schema_changes == 1
    table = wh.client.rest.get_table(f"{wh.project}.{wh.dataset}.typed")
    got = {f.name: (f.field_type, f.description) for f in table.schema}
    for name, typ in cols:
        expected = "STRING" if (typ == "bignumeric" and wh.emulator) else COLUMN_TYPES[typ]
        assert got[name][0] in (expected, {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}.get(expected))
        assert got[name][1] == f"activity type: {typ}"
    assert DEDUP_COLUMN in got  # hidden column for retry safety ...
    assert wh.table_schema("typed") == {"id": "integer", **dict(cols)}  # ... not reported


def test_schema_patch_once_per_new_column_batch(wh) -> None:
    t = "evolve"
    wh.apply(t, [env(t, ins(t, [("id", "integer")], [0]))])
    before = wh.api_calls.copy()
    # three new columns spread over two envelopes and several shapes: one patch
    r = wh.apply(
        t,
        [
            env(
                t,
                ins(t, [("id", "integer"), ("a", "string")], [1, "x"]),
                ins(t, [("id", "integer"), ("b", "float")], [2, 1.5]),
            ),
            env(t, ins(t, [("id", "integer"), ("c", "date")], [3, "2024-01-01"])),
        ],
    )
    assert r.schema_changes == 3 and r.rows_inserted == 3
    assert wh.api_calls["metadata_update"] - before["metadata_update"] == 1
    # steady state: known columns, no metadata calls, no table reads; 3 calls per apply
    before = wh.api_calls.copy()
    for n in range(3):
        wh.apply(
            t, [env(t, *(ins(t, [("id", "integer"), ("a", "string")], [10 + n * 100 + i, "y"]) for i in range(100)))]
        )
    delta = wh.api_calls - before
    assert delta["metadata_update"] == 0 and delta["other"] == 0
    # per apply: one dedup lookup; intent markers, rows, done markers: one AppendRows each
    assert delta["query"] == 3 and delta["write"] == 9 and delta["dml"] == 0
    assert wh.table_schema(t) == {"id": "integer", "a": "string", "b": "float", "c": "date"}


def test_two_instances_add_the_same_column_concurrently(settings) -> None:
    t = "race"
    a, b = BigQueryWarehouse(settings), BigQueryWarehouse(settings)
    try:
        a.apply(t, [env(t, ins(t, [("id", "integer")], [0]))])
        b.table_schema(t)  # both now cache the schema without `extra`
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(w: BigQueryWarehouse, first: int) -> None:
            try:
                barrier.wait()
                acts = [ins(t, [("id", "integer"), ("extra", "string")], [first + i, "e"]) for i in range(5)]
                r = w.apply(t, [env(t, *acts)])
                assert r.rejections == [] and r.rows_inserted == 5
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(a, 1)), threading.Thread(target=run, args=(b, 100))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert errors == []
        assert a.table_schema(t) == {"id": "integer", "extra": "string"}
        assert ids(a, t) == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104]
        # a stale instance that sends another type for a column the other one added is rejected
        c = BigQueryWarehouse(settings)
        try:
            c.schemas.fetch(t)
            a.apply(t, [env(t, ins(t, [("id", "integer"), ("late", "integer")], [200, 1]))])
            r = c.apply(t, [env(t, ins(t, [("id", "integer"), ("late", "string")], [201, "x"]))])
            assert len(r.rejections) == 1 and "late" in r.rejections[0].reason
            assert c.table_schema(t)["late"] == "integer"
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_deletes_are_one_parameterized_dml_job(wh, monkeypatch) -> None:
    t = "del"
    cols = [("id", "integer"), ("name", "string"), ("team", "string")]
    evil = "x'; DROP TABLE del; --"
    wh.apply(
        t,
        [env(t, *(ins(t, cols, row) for row in [[1, "ann", "a"], [2, evil, None], [3, "bob", "b"], [4, "cy", None]]))],
    )
    seen: list[tuple[str, Any]] = []
    # emulator: statements run as jobs (see BigQueryClient._emulator_query)
    real_query = wh.client.rest.query

    def spy(sql: str, job_config: Any = None, **kw: Any) -> Any:
        seen.append((sql, job_config))
        return real_query(sql, job_config=job_config, **kw)

    monkeypatch.setattr(wh.client.rest, "query", spy)
    before = wh.api_calls["dml"]
    r = wh.apply(
        t,
        [
            env(t, dele(t, [("name", "string"), ("team", "string")], [evil, None]), dele(t, [("id", "integer")], [1])),
            env(t, dele(t, [("team", "string")], ["b"])),
        ],
    )
    assert r.rows_deleted == 3 and wh.api_calls["dml"] - before == 1
    deletes = [(sql, cfg) for sql, cfg in seen if sql.startswith("DELETE")]
    assert len(deletes) == 1
    sql, cfg = deletes[0]
    assert sql == (
        f"DELETE FROM `{wh.project}.{wh.dataset}.del` WHERE "
        "(`name` = @p0 AND `team` IS NULL) OR (`id` = @p1) OR (`team` = @p2)"
    )
    assert evil not in sql
    assert [(p.name, p.type_, p.value) for p in cfg.query_parameters] == [
        ("p0", "STRING", evil),
        ("p1", "INT64", 1),
        ("p2", "STRING", "b"),
    ]
    assert ids(wh, t) == [4]


def test_delete_right_after_storage_write_insert(wh) -> None:
    t = "fresh"
    cols = [("id", "integer"), ("k", "string")]
    r = wh.apply(t, [env(t, ins(t, cols, [1, "a"]), ins(t, cols, [2, "b"]), dele(t, [("k", "string")], ["a"]))])
    assert (r.rows_inserted, r.rows_deleted) == (2, 1)
    r = wh.apply(t, [env(t, ins(t, cols, [3, "c"]))])
    r = wh.apply(t, [env(t, dele(t, [("id", "integer")], [3]))])
    assert r.rows_deleted == 1
    assert ids(wh, t) == [2]
    assert wh.client.has_write_client  # inserts went through the Storage Write API


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


def test_failure_after_rows_committed_is_retried_without_duplicates(wh, monkeypatch) -> None:
    t = "retry"
    cols = [("id", "integer")]
    wh.apply(t, [env(t, ins(t, cols, [0]))])
    e = env(t, ins(t, cols, [1]), ins(t, cols, [2]), dele(t, cols, [0]))
    real = wh._write_markers
    calls = {"done": 0}

    def flaky(markers: Any, table: str, dedup_ids: list[str], state: str) -> None:
        if state == "done":
            calls["done"] += 1
            if calls["done"] == 1:
                raise TransientWarehouseError("simulated: completion marker lost")
        real(markers, table, dedup_ids, state)

    monkeypatch.setattr(wh, "_write_markers", flaky)
    with pytest.raises(TransientWarehouseError):
        wh.apply(t, [e])
    assert ids(wh, t) == [1, 2]  # rows and delete committed, completion not
    before = wh.api_calls["dml"]
    r = wh.apply(t, [e])  # the retry finds the intent without completion: leftovers removed first
    assert r.applied_envelopes == 1 and ids(wh, t) == [1, 2]
    assert wh.api_calls["dml"] - before == 2  # the clean-up, then the envelope's delete
    assert wh.apply(t, [e]).skipped_duplicates == 1
    assert ids(wh, t) == [1, 2]


def test_redelivery_after_crash_no_duplicates_without_trusting_delivery_attempt(settings) -> None:
    t = "crash"
    cols = [("id", "integer"), ("k", "string")]
    first = BigQueryWarehouse(settings)
    e = env(t, ins(t, cols, [1, "a"]), ins(t, cols, [2, "b"]))
    try:
        first.apply(t, [env(t, ins(t, cols, [0, "z"]))])
        real = first._write_markers

        def crash_before_completion(markers: Any, table: str, dedup_ids: list[str], state: str) -> None:
            if state == "done":
                raise SystemExit("crash")
            real(markers, table, dedup_ids, state)

        first._write_markers = crash_before_completion  # type: ignore[method-assign]
        with pytest.raises(SystemExit):
            first.apply(t, [e])
    finally:
        first.close()
    second = BigQueryWarehouse(settings)  # a new process gets the redelivery
    try:
        assert ids(second, t) == [0, 1, 2]
        # a broker that does not count attempts reports 1 again: the intent marker decides
        redelivered = Envelope(e.dedup_id, t, e.activities, delivery_attempt=1)
        r = second.apply(t, [redelivered])
        assert r.applied_envelopes == 1 and r.rows_inserted == 2
        assert ids(second, t) == [0, 1, 2]
        again = second.apply(t, [Envelope(e.dedup_id, t, e.activities, delivery_attempt=1)])
        assert again.skipped_duplicates == 1 and ids(second, t) == [0, 1, 2]
    finally:
        second.close()
    third = BigQueryWarehouse(settings)  # no in-process cache: the done marker decides
    try:
        assert third.apply(t, [Envelope(e.dedup_id, t, e.activities)]).skipped_duplicates == 1
        assert ids(third, t) == [0, 1, 2]
    finally:
        third.close()


@pytest.mark.parametrize("columnar", [False, True], ids=["v1", "v2"])
def test_reserved_and_invalid_column_names_are_rejected(wh, columnar: bool) -> None:
    t = "names_v2" if columnar else "names"
    e = env(
        t,
        ins(t, [("id", "integer")], [1]),
        ins(t, [("id", "integer"), (DEDUP_COLUMN, "string")], [2, "x"]),
        ins(t, [("id", "integer"), ("bad-name", "string")], [3, "x"]),
    )
    sent = Envelope(e.dedup_id, t, runs=runs_of(e.activities)) if columnar else e
    r = wh.apply(t, [sent])
    assert [j.index for j in r.rejections] == [1, 2]
    assert "reserved" in r.rejections[0].reason and "not valid" in r.rejections[1].reason
    assert r.rejections[0].activity == e.activities[1]
    assert ids(wh, t) == [1]


def test_query_errors_and_positional_params(wh) -> None:
    from app.warehouse.base import WarehouseQueryError

    t = "q"
    wh.apply(
        t,
        [
            env(
                t,
                ins(t, [("id", "integer"), ("s", "string")], [1, "a"]),
                ins(t, [("id", "integer"), ("s", "string")], [2, "b"]),
            )
        ],
    )
    cols, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{t}` WHERE s = ? AND id > ?", ["b", 0])
    assert cols == ["id"] and rows == [(2,)]
    with pytest.raises(WarehouseQueryError):
        wh.query(f"SELECT nope FROM `{wh.dataset}.{t}`")


# --------------------------------------------------------------------------- cost and limits


def test_user_tables_partitioned_by_ingestion_day_and_clustered(settings) -> None:
    w = BigQueryWarehouse(settings.model_copy(update={"bigquery_clustering": "team, id"}))
    try:
        t = "parted"
        w.apply(t, [env(t, ins(t, [("id", "integer"), ("name", "string")], [1, "a"]))])
        table = w.client.rest.get_table(f"{w.project}.{w.dataset}.{t}")
        assert table.time_partitioning is not None and table.time_partitioning.type_ == "DAY"
        assert table.time_partitioning.field is None  # ingestion time: _PARTITIONTIME
        assert table.clustering_fields == ["id"]  # the configured columns the table has
        plain = "later"
        w.apply(plain, [env(plain, ins(plain, [("name", "string")], ["a"]))])
        assert not w.client.rest.get_table(f"{w.project}.{w.dataset}.{plain}").clustering_fields
        w.apply(plain, [env(plain, ins(plain, [("name", "string"), ("team", "string")], ["b", "x"]))])
        assert w.client.rest.get_table(f"{w.project}.{w.dataset}.{plain}").clustering_fields == ["team"]
    finally:
        w.close()
    unpartitioned = BigQueryWarehouse(settings.model_copy(update={"bigquery_partitioning": "none"}))
    try:
        unpartitioned.apply("flat", [env("flat", ins("flat", [("id", "integer")], [1]))])
        assert (
            unpartitioned.client.rest.get_table(
                f"{settings.gcp_project}.{settings.bigquery_dataset}.flat"
            ).time_partitioning
            is None
        )
    finally:
        unpartitioned.close()


def test_markers_table_is_day_partitioned_with_expiration_and_clustered_for_lookups(wh) -> None:
    wh.apply("m", [env("m", ins("m", [("id", "integer")], [1]))])
    markers = wh.client.rest.get_table(f"{wh.project}.{wh.dataset}.{MARKERS_TABLE}")
    assert markers.time_partitioning.field == "marked_at"
    assert markers.time_partitioning.expiration_ms == MARKER_RETENTION_DAYS * 86_400_000
    assert markers.clustering_fields == ["table_name", "dedup_id"]


def test_schema_patch_starts_from_the_server_schema(wh) -> None:
    t = "owned"
    wh.apply(t, [env(t, ins(t, [("id", "integer"), ("note", "string")], [1, "a"]))])
    # a user documents a column by hand; our cached schema does not know
    table = wh.client.rest.get_table(f"{wh.project}.{wh.dataset}.{t}")
    table.schema = [
        SchemaField(f.name, f.field_type, mode=f.mode, description="written by a person") if f.name == "note" else f
        for f in table.schema
    ]
    wh.client.rest.update_table(table, ["schema"])
    r = wh.apply(t, [env(t, ins(t, [("id", "integer"), ("extra", "integer")], [2, 5]))])
    assert r.schema_changes == 1 and r.rows_inserted == 1
    fields = {f.name: f for f in wh.client.rest.get_table(f"{wh.project}.{wh.dataset}.{t}").schema}
    assert fields["note"].description == "written by a person"
    assert set(fields) == {"id", "note", "extra", DEDUP_COLUMN}


def test_one_long_lived_connection_per_table(wh) -> None:
    t = "conn"
    cols = [("id", "integer")]
    wh.apply(t, [env(t, ins(t, cols, [0]))])
    stream = wh.writer._streams[f"projects/{wh.project}/datasets/{wh.dataset}/tables/{t}/streams/_default"]
    for n in range(1, 4):
        wh.apply(t, [env(t, ins(t, cols, [n]))])
    assert wh.writer._streams[stream_name(wh, t)] is stream  # reused, not reopened
    assert wh.writer.open_streams == 2  # the table and the markers table
    assert ids(wh, t) == [0, 1, 2, 3]


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
    real_append = wh.writer.append
    refused = {"n": 0}

    def append(stream: str, table: str, requests: list) -> None:
        if table == a and refused["n"] == 0:
            real_append(stream, table, requests)  # committed, but the answer says "not yet"
            refused["n"] += 1
            raise SchemaPendingError("BigQuery AppendRows: extra fields: 'note'", retry_after=30.0)
        real_append(stream, table, requests)

    monkeypatch.setattr(wh.writer, "append", append)
    e = env(a, ins(a, [("id", "integer"), ("note", "string")], [1, "n"]))
    with pytest.raises(TransientWarehouseError) as raised:
        wh.apply(a, [e])
    assert raised.value.retry_after == 30.0
    assert wh.apply(b, [env(b, ins(b, [("id", "integer")], [7]))]).rows_inserted == 1  # the other table goes on
    r = wh.apply(a, [e])  # later: written once, the half-written attempt cleaned up
    assert r.applied_envelopes == 1 and ids(wh, a) == [0, 1]


def test_ready_without_permission_to_probe_is_unknown_not_down(wh, monkeypatch) -> None:
    from google.api_core import exceptions as gexc

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise gexc.Forbidden("Access Denied: Dataset", errors=[{"reason": "accessDenied"}])

    monkeypatch.setattr(wh.client.rest, "get_dataset", denied)
    ok, reason = wh.ready()
    assert ok and reason.startswith("unknown")

    def throttled(*args: Any, **kwargs: Any) -> Any:
        raise gexc.Forbidden("Exceeded rate limits", errors=[{"reason": "rateLimitExceeded"}])

    monkeypatch.setattr(wh.client.rest, "get_dataset", throttled)
    assert wh.ready()[0] is False


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


def test_unfinished_delete_on_a_missing_table_retries_as_a_noop(wh, monkeypatch) -> None:
    t = "never_created"
    e = env(t, dele(t, [("id", "integer")], [1]))
    real = wh._write_markers

    def lose_completion(markers: Any, table: str, dedup_ids: list[str], state: str) -> None:
        if state == "done":
            raise TransientWarehouseError("simulated: completion marker lost")
        real(markers, table, dedup_ids, state)

    monkeypatch.setattr(wh, "_write_markers", lose_completion)
    with pytest.raises(TransientWarehouseError):
        wh.apply(t, [e])
    monkeypatch.setattr(wh, "_write_markers", real)
    r = wh.apply(t, [e])  # an intent without completion, but no table to clean
    assert r.applied_envelopes == 1 and r.noop_deletes == 1
    assert wh.table_schema(t) is None


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
    real_append = wh.writer.append
    calls = {"n": 0}

    def append(stream: str, table: str, requests: list) -> None:
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
        real_append(stream, table, requests)

    monkeypatch.setattr(wh.writer, "append", append)
    e = env(t, ins(t, cols, [1, "POINT(1 1)"]), ins(t, cols, [2, "POINT(2 2)"]), ins(t, cols, [3, "POINT(3 3)"]))
    r = wh.apply(t, [Envelope(e.dedup_id, t, runs=runs_of(e.activities)) if columnar else e])
    assert [(j.index, j.activity) for j in r.rejections] == [(1, e.activities[1])]
    assert "bad geography" in r.rejections[0].reason
    assert r.applied_envelopes == 1 and r.rows_inserted == 2
    assert ids(wh, t) == [0, 1, 3]


def test_query_values_render_as_on_duckdb(wh) -> None:
    """The same stored values, read back through BigQuery's client, render like DuckDB's (python -m app query)."""
    from app.pipeline.render import render_rows
    from tests.support.typed_values import TYPED_COLUMNS

    cols = [("id", "integer")] + [(name, typ) for name, typ, _, _ in TYPED_COLUMNS]
    acts = [ins("every_type", cols, [row] + [c[2][row] for c in TYPED_COLUMNS]) for row in range(3)]
    assert wh.apply("every_type", [env("every_type", *acts)]).rejections == []
    # bqemulator quirks only: BYTES and GEOGRAPHY do not round-trip through its query results.
    quirk = {"bytes": "TO_BASE64({0}) AS {0}", "geography": "ST_ASTEXT({0}) AS {0}"}
    select = ", ".join(quirk.get(typ, "{0}").format(name) for name, typ, _, _ in TYPED_COLUMNS)
    result = wh.query(f"SELECT {select} FROM `{wh.dataset}.every_type` ORDER BY id")
    columns, rows = result
    assert columns == [c[0] for c in TYPED_COLUMNS] and len(result.types) == len(columns)
    rendered = render_rows(rows, result.types)
    expected = [[c[3][row] for c in TYPED_COLUMNS] for row in range(3)]
    names = [c[0] for c in TYPED_COLUMNS]
    record, geography = names.index("r"), names.index("g")
    for got, want in zip(rendered, expected):
        import json

        # a record renders as its JSON text; compare it as JSON
        got[record] = None if got[record] is None else json.loads(got[record])
        # the emulator's ST_ASTEXT writes "POINT (1 2)" where BigQuery writes "POINT(1 2)"
        got[geography] = None if got[geography] is None else got[geography].replace(" (", "(")
        assert got == want


@pytest.mark.parametrize("emulator", [False, True], ids=["google", "emulator"])
def test_arrow_columns_are_what_the_storage_write_api_takes(emulator: bool) -> None:
    # Rows go out in the type table's Arrow types; only BIGNUMERIC changes form (Google
    # takes decimal256(76, 38); the emulator's STRING column keeps the canonical text),
    # and the conversion must be exact for all 76 digits.
    from app.schema.columnar import to_arrow
    from app.warehouse.bigquery.types import TypeMapper

    mapper = TypeMapper(emulator)
    for typ in TYPE_NAMES:
        if typ != "bignumeric":
            assert mapper.arrow_type(typ) == TYPES[typ].arrow_type
            column = to_arrow(typ, [None])
            assert mapper.arrow_column(typ, column) is column  # sent as it is
    big = ["-" + "9" * 38 + "." + "1234567890" * 3 + "12345678", "0." + "0" * 37 + "1", "0", None]
    sent = mapper.arrow_column("bignumeric", to_arrow("bignumeric", big))
    if emulator:
        assert sent.type == pa.string() and sent.to_pylist() == big
    else:
        assert sent.type == pa.decimal256(76, 38)
        assert sent.to_pylist() == [None if v is None else Decimal(v) for v in big]
