"""The SQL the warehouse runs: parameterized deletes, clean-ups of unfinished attempts (app/warehouse/bigquery/queries.py).

Over the wire against bqemulator unless a test says otherwise (fixtures in conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from app.warehouse.base import TransientWarehouseError


from app.warehouse.bigquery.queries import INTENT
from tests.support.builders import dele, env, ins
from tests.warehouse.bigquery.support import ids, pause_before_first_dml


def test_deletes_are_one_parameterized_dml_job(wh, monkeypatch) -> None:
    t = "del"
    cols = [("id", "integer"), ("name", "string"), ("team", "string")]
    evil = "x'; DROP TABLE del; --"
    wh.apply(
        t,
        [env(t, *(ins(t, cols, row) for row in [[1, "ann", "a"], [2, evil, None], [3, "bob", "b"], [4, "cy", None]]))],
    )
    seen: list[tuple[str, Any]] = []
    # DML runs as jobs with deterministic ids (see BigQueryClient.dml)
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
        "(_PARTITIONTIME IS NULL OR _PARTITIONTIME >= TIMESTAMP '1970-01-01') AND "  # every partition: see queries.py
        "((`name` = @p0 AND `team` IS NULL) OR (`id` = @p1) OR (`team` = @p2)) AND NOT EXISTS (SELECT 1 FROM "
        f"`{wh.project}.{wh.dataset}._ingest_markers` AS fence"  # fenced: see OwnerFence
    ) + sql[sql.index(" WHERE fence.table_name"):]
    assert evil not in sql
    assert [(p.name, p.type_, p.value) for p in cfg.query_parameters[:3]] == [
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


def test_unfinished_delete_on_a_missing_table_retries_as_a_noop(wh, monkeypatch) -> None:
    t = "never_created"
    e = env(t, dele(t, [("id", "integer")], [1]))
    real = wh._write_markers

    def lose_completion(markers: Any, per_table: list, state: str) -> Any:
        if state == "done":
            raise TransientWarehouseError("simulated: completion marker lost")
        return real(markers, per_table, state)

    monkeypatch.setattr(wh, "_write_markers", lose_completion)
    with pytest.raises(TransientWarehouseError):
        wh.apply(t, [e])
    monkeypatch.setattr(wh, "_write_markers", real)
    r = wh.apply(t, [e])  # an intent without completion, but no table to clean
    assert r.applied_envelopes == 1 and r.noop_deletes == 1
    assert wh.table_schema(t) is None


# A stale attempt's DML that reaches BigQuery late (a replica paused after its claim, or a
# job queued behind others) runs after a newer attempt claimed and applied the same ids.
# Fenced in the statement (OwnerFence), it changes nothing; its apply then stops.


def test_a_stale_attempts_late_clean_up_leaves_the_newer_attempts_rows(wh, other_replica) -> None:
    t = "fenced_clean"
    cols = [("id", "integer")]
    wh.apply(t, [env(t, ins(t, cols, [0]))])
    e = env(t, ins(t, cols, [1]), ins(t, cols, [2]))
    # an attempt that crashed after its intent: whoever gets `e` next cleans up after it
    wh._write_markers(wh.schemas.ensure_markers(), [(t, [e.dedup_id], "crashed")], INTENT)
    pause_before_first_dml(wh, lambda: other_replica.apply(t, [e]))
    with pytest.raises(TransientWarehouseError, match="newer attempt"):
        wh.apply(t, [e])
    assert ids(wh, t) == [0, 1, 2]  # the other replica's rows, once
    assert other_replica.apply(t, [e]).skipped_duplicates == 1


def test_a_stale_attempts_late_delete_leaves_rows_written_after_it(wh, other_replica) -> None:
    t = "fenced_delete"
    cols = [("id", "integer"), ("name", "string")]
    wh.apply(t, [env(t, ins(t, cols, [1, "x"]))])
    e = env(t, dele(t, [("name", "string")], ["x"]))
    later = env(t, ins(t, cols, [2, "x"]))
    pause_before_first_dml(wh, lambda: (other_replica.apply(t, [e]), other_replica.apply(t, [later])))
    with pytest.raises(TransientWarehouseError, match="newer attempt"):
        wh.apply(t, [e])
    assert ids(wh, t) == [2]  # deleted once, by the owner; the later row stays
