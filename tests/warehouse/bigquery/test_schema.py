"""Tables and their schemas: creation, patches, partitioning, clustering (app/warehouse/bigquery/schema.py).

Over the wire against bqemulator unless a test says otherwise (fixtures in conftest.py).
"""

from __future__ import annotations

import threading

from google.cloud.bigquery import SchemaField

from app.schema.types import TYPE_NAMES
from app.warehouse.bigquery import DEDUP_COLUMN, MARKERS_TABLE, BigQueryWarehouse
from app.warehouse.bigquery.schema import MARKER_RETENTION_DAYS


from tests.support.builders import env, ins
from tests.warehouse.bigquery.support import ids


def test_table_created_with_type_map_and_descriptions(wh) -> None:
    cols = [(f"c_{t}", t) for t in TYPE_NAMES]
    r = wh.apply("typed", [env("typed", ins("typed", [("id", "integer"), *cols], [1] + [None] * len(cols)))])
    assert r.rejections == [] and r.schema_changes == 1
    table = wh.client.rest.get_table(f"{wh.project}.{wh.dataset}.typed")
    got = {f.name: (f.field_type, f.description) for f in table.schema}
    for name, typ in cols:
        expected = wh.type_mapper.column_type(typ)  # Google's, but for the emulator's declared override
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
