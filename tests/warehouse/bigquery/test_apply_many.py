"""Several tables in one `apply_many` (app/warehouse/bigquery/warehouse.py): shared marker
lookup and writes, per-table isolation. Over the wire against bqemulator."""

from __future__ import annotations

from typing import Any

import pytest

from app.warehouse.base import ApplyResult, TransientWarehouseError
from tests.support.builders import dele, env, ins
from tests.warehouse.bigquery.support import ids

COLS = [("id", "integer")]


def batches(tables: list[str], first: int = 0) -> list[tuple[str, list]]:
    return [(t, [env(t, ins(t, COLS, [first + n]))]) for n, t in enumerate(tables)]


def test_many_tables_share_one_lookup_one_intent_write_and_one_done_write(wh, monkeypatch) -> None:
    assert wh.capabilities.max_tables_per_apply > 1
    tables = [f"many_{i}" for i in range(6)]
    wh.apply_many(batches(tables))  # creates the tables and the markers table
    marker_writes: list[tuple[str, int]] = []
    real = wh._write_markers

    def counted(markers: Any, per_table: list, state: str) -> Any:
        marker_writes.append((state, len(per_table)))
        return real(markers, per_table, state)

    monkeypatch.setattr(wh, "_write_markers", counted)
    queries, writes = wh.api_calls["query"], wh.api_calls["write"]
    outcomes = wh.apply_many(batches(tables, first=100))
    assert all(isinstance(o, ApplyResult) and o.rows_inserted == 1 for o in outcomes), outcomes
    # one dedup lookup and two owner checks (before the commits, before `done`) for all tables
    assert wh.api_calls["query"] - queries == 3
    assert marker_writes == [("intent", 6), ("done", 6)]
    assert wh.api_calls["write"] - writes == len(tables) + 2  # one append per table, one per marker write
    assert [ids(wh, t) for t in tables] == [[n, 100 + n] for n in range(6)]


def test_a_table_that_fails_gets_its_error_while_the_others_commit(wh, monkeypatch) -> None:
    tables = ["iso_a", "iso_b", "iso_c"]
    real_stage = wh.writer.stage

    def stage(parent: str, table: str, requests: list) -> Any:
        if table == "iso_b":
            raise TransientWarehouseError("simulated: AppendRows to iso_b unavailable")
        return real_stage(parent, table, requests)

    monkeypatch.setattr(wh.writer, "stage", stage)
    sent = batches(tables)
    outcomes = wh.apply_many(sent)
    assert isinstance(outcomes[1], TransientWarehouseError)
    assert [o.rows_inserted for o in (outcomes[0], outcomes[2])] == [1, 1]
    assert ids(wh, "iso_a") == [0] and ids(wh, "iso_c") == [2]
    monkeypatch.setattr(wh.writer, "stage", real_stage)
    again = wh.apply_many(sent)  # redelivered: the failed table applies, the others are duplicates
    assert [o.skipped_duplicates for o in again] == [1, 0, 1] and again[1].applied_envelopes == 1
    assert [ids(wh, t) for t in tables] == [[0], [1], [2]]


def test_a_schema_failure_stays_with_its_table(wh, monkeypatch) -> None:
    real_create = wh.schemas.create

    def create(ref, columns, *key):
        if ref.table == "schema_b":
            raise TransientWarehouseError("simulated: tables.insert rate limited")
        return real_create(ref, columns, *key)

    monkeypatch.setattr(wh.schemas, "create", create)
    outcomes = wh.apply_many(batches(["schema_a", "schema_b"]))
    assert isinstance(outcomes[0], ApplyResult) and isinstance(outcomes[1], TransientWarehouseError)
    assert ids(wh, "schema_a") == [0] and wh.table_schema("schema_b") is None


def test_a_lost_done_write_fails_every_table_of_the_call_and_the_retry_lands_each_row_once(wh, monkeypatch) -> None:
    tables = ["lost_a", "lost_b"]
    sent = batches(tables)
    real = wh._write_markers
    monkeypatch.setattr(
        wh,
        "_write_markers",
        lambda markers, per_table, state: (_ for _ in ()).throw(TransientWarehouseError("simulated: done lost"))
        if state == "done"
        else real(markers, per_table, state),
    )
    assert all(isinstance(o, TransientWarehouseError) for o in wh.apply_many(sent))
    monkeypatch.setattr(wh, "_write_markers", real)
    again = wh.apply_many(sent)  # intents without completion: rows of the first attempt cleaned up
    assert [o.applied_envelopes for o in again] == [1, 1]
    assert [ids(wh, t) for t in tables] == [[0], [1]]


def test_a_table_named_twice_applies_both_batches_in_order(wh) -> None:
    t = "twice"
    outcomes = wh.apply_many([(t, [env(t, ins(t, COLS, [1]))]), ("other", [env("other", ins("other", COLS, [5]))]),
                              (t, [env(t, ins(t, COLS, [2]))])])  # fmt: skip
    assert [o.rows_inserted for o in outcomes] == [1, 1, 1]
    assert ids(wh, t) == [1, 2]


@pytest.mark.parametrize("bad", ["bad-name", ""])
def test_an_invalid_table_name_is_rejected_without_stopping_the_others(wh, bad: str) -> None:
    outcomes = wh.apply_many([(bad, [env(bad, ins(bad, COLS, [1]))]), ("fine", [env("fine", ins("fine", COLS, [1]))])])
    assert len(outcomes[0].rejections) == 1 and outcomes[1].rows_inserted == 1


def _reads_of_tables(wh, monkeypatch) -> tuple[list[str], list[int]]:
    """Counts the calls that learn tables' schemas: `tables.get` of user tables, and listings."""
    gets: list[str] = []
    listings = [0]
    real_get, real_list = wh.client.get_table, wh.client.list_tables

    def get_table(table_id: str) -> Any:
        if not table_id.endswith("._ingest_markers"):
            gets.append(table_id.rsplit(".", 1)[1])
        return real_get(table_id)

    def list_tables() -> list[str]:
        listings[0] += 1
        return real_list()

    monkeypatch.setattr(wh.client, "get_table", get_table)
    monkeypatch.setattr(wh.client, "list_tables", list_tables)
    return gets, listings


def test_new_tables_are_found_missing_by_one_listing_not_a_read_each(wh, monkeypatch) -> None:
    wh.apply_many(batches(["known"]))  # the markers table exists, `known` is cached
    gets, listings = _reads_of_tables(wh, monkeypatch)
    tables = [f"fresh_{i}" for i in range(6)]
    outcomes = wh.apply_many(batches(["known", *tables], first=10))
    assert all(isinstance(o, ApplyResult) and o.rows_inserted == 1 for o in outcomes), outcomes
    assert (gets, listings[0]) == ([], 1)  # was a tables.get per new table
    assert [ids(wh, t) for t in tables] == [[11 + n] for n in range(6)]


def test_one_new_table_is_read_not_listed(wh, monkeypatch) -> None:
    wh.apply_many(batches(["known"]))
    gets, listings = _reads_of_tables(wh, monkeypatch)
    wh.apply_many(batches(["known", "alone"], first=10))
    assert (gets, listings[0]) == (["alone"], 0)  # a listing would cost as much as the read


def test_a_table_a_lagging_listing_missed_is_read_when_its_create_is_refused(wh, other_replica, monkeypatch) -> None:
    other_replica.apply_many(batches(["lag_a"]))  # another replica created it, with row 0
    monkeypatch.setattr(wh.client, "list_tables", lambda: [])  # a listing that does not show it yet
    outcomes = wh.apply_many([("lag_a", [env("lag_a", ins("lag_a", COLS, [1]))]), *batches(["lag_b"], first=2)])
    assert all(isinstance(o, ApplyResult) and o.rows_inserted == 1 for o in outcomes), outcomes
    assert ids(wh, "lag_a") == [0, 1] and ids(wh, "lag_b") == [2]


def test_a_delete_on_a_table_a_lagging_listing_missed_still_deletes(wh, other_replica, monkeypatch) -> None:
    other_replica.apply_many([("lag_del", [env("lag_del", ins("lag_del", COLS, [0]), ins("lag_del", COLS, [1]))])])
    monkeypatch.setattr(wh.client, "list_tables", lambda: [])
    outcomes = wh.apply_many(
        [("lag_del", [env("lag_del", dele("lag_del", COLS, [0]))]), *batches(["lag_new"], first=5)]
    )
    assert isinstance(outcomes[0], ApplyResult) and outcomes[0].rows_deleted == 1, outcomes
    assert ids(wh, "lag_del") == [1] and ids(wh, "lag_new") == [5]
