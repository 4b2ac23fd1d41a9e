"""BigQuery upserts beyond the shared contract (app/warehouse/bigquery/upsert.py): exactly once
across a crash, the recorded key, the fence against a superseded attempt, bound values.

Over the wire against bqemulator (fixtures in conftest.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from app.warehouse import plan as planner
from app.warehouse.base import Envelope, TransientWarehouseError
from app.warehouse.bigquery import BigQueryWarehouse
from app.warehouse.bigquery.queries import OwnerFence
from app.warehouse.bigquery.schema import TableRef
from app.warehouse.bigquery.types import TypeMapper
from app.warehouse.bigquery.upsert import merge_sql, upsert_statements
from tests.support.builders import env, ins, ups
from tests.warehouse.bigquery.support import crash_before_done, pause_before_first_dml

COLS = [("id", "integer"), ("v", "string")]


def rows(wh: BigQueryWarehouse, table: str) -> list[tuple]:
    _, got = wh.query(f"SELECT id, v FROM `{wh.dataset}.{table}`")
    return sorted(got)


def test_redelivery_after_a_crash_past_the_merge_leaves_each_key_once_with_its_last_value(settings) -> None:
    t = "crash"
    e = env(t, ups(t, COLS, [1, "b"], ["id"]), ups(t, COLS, [2, "c"], ["id"]), ups(t, COLS, [2, "d"], ["id"]))
    crash_before_done(settings, t, env(t, ups(t, COLS, [1, "a"], ["id"])), e)
    second = BigQueryWarehouse(settings)  # a new process gets the redelivery
    try:
        assert rows(second, t) == [(1, "b"), (2, "d")]  # the MERGE ran, its completion was lost
        r = second.apply(t, [Envelope(e.dedup_id, t, e.activities, delivery_attempt=1)])
        assert r.applied_envelopes == 1 and r.rows_upserted == 3
        assert rows(second, t) == [(1, "b"), (2, "d")]
        assert second.apply(t, [Envelope(e.dedup_id, t, e.activities)]).skipped_duplicates == 1
        assert rows(second, t) == [(1, "b"), (2, "d")]
    finally:
        second.close()


def test_the_key_is_recorded_and_a_new_process_refuses_another_key(settings, wh, monkeypatch) -> None:
    t = "keyed"
    sent: list = []
    real_create = wh.client.create_table

    def create_table(table: Any, **kwargs: Any) -> Any:
        sent.append((table.table_id, table.table_constraints))
        return real_create(table, **kwargs)

    monkeypatch.setattr(wh.client, "create_table", create_table)
    wh.apply(t, [env(t, ups(t, COLS, [1, "a"], ["id"]))])
    # declared in the request (bqemulator does not keep table constraints; Google does)
    assert [(name, c and c.primary_key.columns) for name, c in sent if name == t] == [(t, ["id"])], sent
    later = BigQueryWarehouse(settings)  # nothing cached: the key is read from the table
    try:
        r = later.apply(t, [env(t, ups(t, COLS, [1, "x"], ["v"]), ins(t, COLS, [1, "b"]))])
        assert [x.index for x in r.rejections] == [0] and "has the key (id)" in r.rejections[0].reason
        assert rows(later, t) == [(1, "b")]  # the insert on the keyed table was an upsert
    finally:
        later.close()


def test_a_table_keyed_after_inserts_records_its_key_without_declaring_it(wh) -> None:
    t = "later"
    wh.apply(t, [env(t, ins(t, COLS, [1, "a"]), ins(t, COLS, [1, "b"]))])
    wh.apply(t, [env(t, ups(t, COLS, [2, "c"], ["id"]))])
    table = wh.client.get_table(f"{wh.project}.{wh.dataset}.{t}")
    assert table.table_constraints is None  # rows sharing a key may remain: not declared
    assert wh.schemas.fetch(t).schema.key == ("id",)
    assert rows(wh, t) == [(1, "a"), (1, "b"), (2, "c")]


def test_a_stale_attempts_late_merge_puts_back_nothing(wh, other_replica) -> None:
    t = "fenced"
    wh.apply(t, [env(t, ups(t, COLS, [1, "a"], ["id"]))])
    e = env(t, ups(t, COLS, [1, "old"], ["id"]))
    later = env(t, ups(t, COLS, [1, "new"], ["id"]))
    pause_before_first_dml(wh, lambda: (other_replica.apply(t, [e]), other_replica.apply(t, [later])))
    with pytest.raises(TransientWarehouseError, match="newer attempt"):
        wh.apply(t, [e])
    assert rows(wh, t) == [(1, "new")]


def test_every_value_is_bound_and_a_run_keeps_the_last_row_per_key() -> None:
    plan = planner.plan_table(
        "t",
        None,
        [env("t", ups("t", COLS, [1, "secret-a"], ["id"]), ups("t", COLS, [1, "secret-b"], ["id"]))],
        upserts=True,
    )
    [step] = [s for s in plan.steps if isinstance(s, planner.UpsertRows)]
    ref = TableRef("p", "d", "t")
    fence = OwnerFence(TableRef("p", "d", "_ingest_markers"), "t", ("id1",), "attempt", dt.datetime.now(dt.timezone.utc))
    [(sql, params)] = upsert_statements(ref, step, TypeMapper(), fence, partitioned=True)
    assert sql == merge_sql(ref, step, TypeMapper(), fence, partitioned=True) and "secret" not in sql
    assert "_PARTITIONTIME" in sql  # a table requiring a partition filter takes it
    assert sql.count(fence.sql()) == 2  # both actions fenced
    rows_param, *fence_params = params
    assert fence_params == fence.params()
    assert [(row.struct_values["c0"], row.struct_values["c1"]) for row in rows_param.values] == [(1, "secret-b")]
