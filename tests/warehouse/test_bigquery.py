"""BigQuery specifics over the wire against bqemulator (the shared contract runs in test_contract.py).

One emulator per session (tests.support.bqemulator.shared_emulator), a fresh dataset per
test. Skipped when the emulator cannot start, except with CI=true where that fails.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal
from typing import Any, Iterator

import pytest

from app.schema.activity import Activity
from app.schema.types import TYPE_NAMES, TYPES
from app.settings import Settings
from app.warehouse.base import Envelope, TerminalWarehouseError, TransientWarehouseError
from app.warehouse.bigquery import DEDUP_COLUMN, BigQueryWarehouse, ensure_dataset


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
        expected = "STRING" if (typ == "bignumeric" and wh.emulator) else TYPES[typ].bigquery_type
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
            env(t, ins(t, [("id", "integer"), ("a", "string")], [1, "x"]), ins(t, [("id", "integer"), ("b", "float")], [2, 1.5])),
            env(t, ins(t, [("id", "integer"), ("c", "date")], [3, "2024-01-01"])),
        ],
    )
    assert r.schema_changes == 3 and r.rows_inserted == 3
    assert wh.api_calls["metadata_update"] - before["metadata_update"] == 1
    # steady state: known columns, no metadata calls, no table reads; 3 calls per apply
    before = wh.api_calls.copy()
    for n in range(3):
        wh.apply(t, [env(t, *(ins(t, [("id", "integer"), ("a", "string")], [10 + n * 100 + i, "y"]) for i in range(100)))])
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
    wh.apply(t, [env(t, *(ins(t, cols, row) for row in [[1, "ann", "a"], [2, evil, None], [3, "bob", "b"], [4, "cy", None]]))])
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


def test_insert_all_fallback(settings) -> None:
    w = BigQueryWarehouse(settings.model_copy(update={"bigquery_insert_mode": "insert_all"}))
    try:
        t = "legacy"
        cols = [("id", "integer"), ("f", "float"), ("n", "numeric"), ("ts", "timestamp"), ("r", "record"), ("g", "geography")]
        e = env(t, ins(t, cols, [1, "NaN", "1.5", "2024-01-02T03:04:05.000006Z", {"a": [1]}, "POINT(1 2)"]), ins(t, cols, [2, 2.5, None, None, None, None]))
        r = w.apply(t, [e])
        assert r.rows_inserted == 2 and r.rejections == []
        assert w.apply(t, [e]).skipped_duplicates == 1
        assert not w.client.has_write_client  # no Storage Write client was needed
        _, rows = w.query(f"SELECT id, IS_NAN(f), n, ts, TO_JSON_STRING(r), ST_ASTEXT(g) FROM `{w.dataset}.{t}` ORDER BY id")
        assert rows[0][:3] == (1, True, Decimal("1.5")) and rows[0][4] == '{"a":[1]}' and rows[0][5].replace(" ", "") == "POINT(12)"
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


def test_reserved_and_invalid_column_names_are_rejected(wh) -> None:
    t = "names"
    e = env(
        t,
        ins(t, [("id", "integer")], [1]),
        ins(t, [("id", "integer"), (DEDUP_COLUMN, "string")], [2, "x"]),
        ins(t, [("id", "integer"), ("bad-name", "string")], [3, "x"]),
    )
    r = wh.apply(t, [e])
    assert [j.index for j in r.rejections] == [1, 2]
    assert "reserved" in r.rejections[0].reason and "not valid" in r.rejections[1].reason
    assert r.rejections[0].activity is e.activities[1]
    assert ids(wh, t) == [1]


def test_query_errors_and_positional_params(wh) -> None:
    from app.warehouse.base import WarehouseQueryError

    t = "q"
    wh.apply(t, [env(t, ins(t, [("id", "integer"), ("s", "string")], [1, "a"]), ins(t, [("id", "integer"), ("s", "string")], [2, "b"]))])
    cols, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{t}` WHERE s = ? AND id > ?", ["b", 0])
    assert cols == ["id"] and rows == [(2,)]
    with pytest.raises(WarehouseQueryError):
        wh.query(f"SELECT nope FROM `{wh.dataset}.{t}`")
