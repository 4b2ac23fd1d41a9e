"""`coalesce_steps`: inserts first, deletes after, only when that leaves the same rows."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.schema.activity import Activity
from app.schema.columnar import runs_of
from app.warehouse.base import Envelope
from app.warehouse.plan import InsertRows, Plan, coalesce_steps, plan_table
from tests.support.reference import canon, execute


def _kinds(steps: list) -> list[str]:
    return [type(s).__name__ for s in steps]


def _plan(*acts: Activity) -> Plan:
    return plan_table("t", {"k": ("k", "integer"), "s": ("s", "string"), "f": ("f", "float")}, [Envelope("b:t:0", "t", list(acts))])


def test_unrelated_deletes_move_after_all_inserts() -> None:
    plan = _plan(
        Activity("insert", "t", ["k"], ["integer"], [1]),
        Activity("delete", "t", ["k"], ["integer"], [1]),
        Activity("insert", "t", ["k", "s"], ["integer", "string"], [2, "x"]),
        Activity("delete", "t", ["s"], ["string"], ["zz"]),
        Activity("insert", "t", ["k"], ["integer"], [3]),
    )
    assert _kinds(plan.steps) == ["InsertRows", "DeleteRows", "InsertRows", "DeleteRows", "InsertRows"]
    merged = coalesce_steps(plan.steps)
    assert _kinds(merged) == ["InsertRows", "DeleteRows"]
    assert merged[0].canonical_values() == {"k": [1, 2, 3], "s": [None, "x", None]} and merged[0].count == 3
    assert canon(execute(merged)) == canon(execute(plan.steps))


def test_delete_matching_a_later_insert_keeps_the_barrier() -> None:
    plan = _plan(
        Activity("insert", "t", ["k"], ["integer"], [1]),
        Activity("delete", "t", ["k"], ["integer"], [2]),
        Activity("insert", "t", ["k"], ["integer"], [2]),
    )
    assert coalesce_steps(plan.steps) == plan.steps


def test_inexact_types_keep_the_barrier() -> None:
    plan = _plan(
        Activity("insert", "t", ["f"], ["float"], [1.0]),
        Activity("delete", "t", ["f"], ["float"], [2.0]),
        Activity("insert", "t", ["f"], ["float"], [3.0]),
    )
    assert coalesce_steps(plan.steps) == plan.steps


_cols = st.sampled_from([("a", "integer"), ("b", "string"), ("c", "integer")])


@st.composite
def _activity(draw: Any) -> Activity:
    cols = draw(st.lists(_cols, min_size=1, max_size=3, unique_by=lambda c: c[0]))
    values = [draw(st.one_of(st.none(), st.integers(0, 2))) if t == "integer" else draw(st.sampled_from([None, "x", "y"])) for _, t in cols]
    op = draw(st.sampled_from(["insert", "insert", "delete"]))
    return Activity(op, "t", [c for c, _ in cols], [t for _, t in cols], values)


@settings(max_examples=400, deadline=None)
@given(st.lists(_activity(), max_size=14), st.booleans())
def test_coalesced_plan_leaves_the_same_rows(acts: list[Activity], columnar: bool) -> None:
    envelope = Envelope("b:t:0", "t", runs=runs_of(acts)) if columnar else Envelope("b:t:0", "t", acts)
    plan = plan_table("t", {"a": ("a", "integer"), "b": ("b", "string"), "c": ("c", "integer")}, [envelope])
    merged = coalesce_steps(plan.steps)
    assert canon(execute(merged)) == canon(execute(plan.steps))
    assert sum(s.count for s in merged if isinstance(s, InsertRows)) == plan.rows_to_insert
