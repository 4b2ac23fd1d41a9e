"""The in-memory warehouse's test hooks (its warehouse behaviour is the contract suite's)."""

from __future__ import annotations

import pytest

from app.warehouse.base import TransientWarehouseError, WarehouseQueryError
from tests.support.builders import env, ins
from tests.support.memory_warehouse import MemoryWarehouse

COLS = [("id", "integer")]


def test_an_error_raised_before_apply_commits_nothing_and_is_counted() -> None:
    failures = [TransientWarehouseError("throttled", retry_after=2.0)]

    def before_apply(table, envelopes):
        if failures:
            raise failures.pop()

    wh = MemoryWarehouse(before_apply=before_apply)
    e = env("t", ins("t", COLS, [1]))
    with pytest.raises(TransientWarehouseError):
        wh.apply("t", [e])
    assert wh.table_schema("t") is None and wh.observer.applied["t"] == []
    assert wh.apply("t", [e]).applied_envelopes == 1
    assert wh.observer.attempts["t"] == 2 and wh.observer.applied["t"] == [[e]]


def test_only_committed_new_envelopes_are_recorded_as_applied() -> None:
    wh = MemoryWarehouse()
    first, second = env("t", ins("t", COLS, [1])), env("t", ins("t", COLS, [2]))
    wh.apply("t", [first])
    wh.apply("t", [first, second])
    assert wh.observer.applied["t"] == [[first], [second]]


def test_queries_see_copies_and_only_read() -> None:
    wh = MemoryWarehouse()
    wh.apply("t", [env("t", ins("t", COLS, [1]))])
    with pytest.raises(WarehouseQueryError):
        wh.query("SELECT 1; DELETE FROM t")
    with pytest.raises(WarehouseQueryError):
        wh.query("COPY t TO 'out.csv'")
    with pytest.raises(WarehouseQueryError):
        wh.query("SELECT * FROM read_csv('/etc/passwd')")
    assert wh.query("SELECT id FROM t") == (["id"], [(1,)])
