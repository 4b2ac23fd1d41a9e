"""The backend-neutral planner (app.warehouse.plan), without any warehouse."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.schema.activity import Activity
from app.warehouse.base import Envelope
import pyarrow as pa

from app.schema.columnar import runs_of
from app.schema.types import TYPES
from tests.support.builders import dele, env, ins
from tests.support.reference import canon, execute
from app.warehouse.plan import AddColumns, CreateTable, DeleteRows, InsertRows, Plan, plan_table


def kinds(plan: Plan) -> list[str]:
    return [type(s).__name__ for s in plan.steps]


def test_inserts_merge_across_envelopes_and_column_sets() -> None:
    plan = plan_table(
        "t",
        None,
        [
            env("t", ins("t", [("id", "integer"), ("a", "string")], [1, "x"]), ins("t", [("id", "integer"), ("a", "string")], [2, "y"])),
            env("t", ins("t", [("b", "float"), ("ID", "integer")], [0.5, 3])),
            env("t", ins("t", [("id", "integer")], [4]), ins("t", [("id", "integer"), ("a", "string")], [5, "z"])),
        ],
    )
    assert kinds(plan) == ["CreateTable", "InsertRows"]
    create, insert = plan.steps
    assert isinstance(create, CreateTable) and create.columns == [("id", "integer"), ("a", "string"), ("b", "float")]
    assert isinstance(insert, InsertRows)
    assert insert.count == 5 and plan.rows_to_insert == 5
    assert insert.columns == [("id", "integer"), ("a", "string"), ("b", "float")]
    assert insert.canonical_values() == {"id": [1, 2, 3, 4, 5], "a": ["x", "y", None, None, "z"], "b": [None, None, 0.5, None, None]}
    assert plan.schema_changes == 1  # one table created (its columns come with it)
    assert plan.schema == {"id": ("id", "integer"), "a": ("a", "string"), "b": ("b", "float")}


def test_existing_table_columns_added_once_and_hoisted() -> None:
    schema = {"id": ("Id", "integer")}
    plan = plan_table(
        "t",
        schema,
        [
            env("t", ins("t", [("id", "integer")], [1]), dele("t", [("ID", "integer")], [1])),
            env("t", ins("t", [("id", "integer"), ("New", "string")], [2, "n"]), ins("t", [("id", "integer"), ("new", "string")], [3, "m"])),
            env("t", ins("t", [("x", "boolean")], [True])),
        ],
    )
    assert kinds(plan) == ["AddColumns", "InsertRows", "DeleteRows", "InsertRows"]
    add, first, delete, second = plan.steps
    assert isinstance(add, AddColumns) and add.columns == [("New", "string"), ("x", "boolean")]
    assert plan.schema_changes == 2
    assert isinstance(first, InsertRows) and first.canonical_values() == {"Id": [1]}
    assert isinstance(delete, DeleteRows) and delete.conditions == [[("Id", "integer", 1)]]
    assert isinstance(second, InsertRows)
    assert second.columns == [("Id", "integer"), ("New", "string"), ("x", "boolean")]
    assert second.canonical_values() == {"Id": [2, 3, None], "New": ["n", "m", None], "x": [None, None, True]}
    assert schema == {"id": ("Id", "integer")}  # input not mutated


def test_consecutive_deletes_grouped_and_barrier() -> None:
    c = [("k", "string")]
    plan = plan_table(
        "t",
        {"k": ("k", "string")},
        [env("t", dele("t", c, ["a"]), dele("t", c, [None]), ins("t", c, ["b"]), dele("t", c, ["b"]))],
    )
    assert kinds(plan) == ["DeleteRows", "InsertRows", "DeleteRows"]
    assert plan.steps[0].conditions == [[("k", "string", "a")], [("k", "string", None)]]
    assert plan.deletes == 3


def test_rejections() -> None:
    schema = {"x": ("x", "integer")}
    e = env(
        "t",
        ins("t", [("x", "string")], ["s"]),  # 0 type conflict
        dele("t", [("y", "integer")], [1]),  # 1 unknown column
        dele("t", [("x", "float")], [1.0]),  # 2 delete type conflict
        ins("t", [("x", "integer"), ("X", "integer")], [1, 2]),  # 3 duplicate column
        Activity("insert", "t", ["x"], ["integer"], [1, 2]),  # 4 length mismatch
        ins("t", [("z", "money")], [1]),  # 5 unknown type
        Activity("upsert", "t", ["x"], ["integer"], [1]),  # 6 unknown operation
        dele("t", [], []),  # 7 delete everything: refused
        ins("t", [('a"; DROP TABLE t; --', "integer")], [1]),  # 8 invalid name
        ins("t", [("x", "integer")], [9]),  # 9 fine
        ins("t", [("x", "string")], ["again"]),  # 10 type conflict (cached shape)
        Activity("insert", "t", ["x"], [["integer"]], [1]),  # 11 not a string (unhashable)
        Activity("delete", "t", [{"x": 1}], ["integer"], [1]),  # 12 not a string
        dedup_id="b:t:7",
    )
    plan = plan_table("t", schema, [e])
    assert [r.index for r in plan.rejections] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    assert all(r.dedup_id == "b:t:7" for r in plan.rejections)
    reasons = [r.reason for r in plan.rejections]
    assert reasons[0] == "column 'x' is integer in table t, activity sends string"
    assert reasons[1] == "delete names column 'y' which table t does not have"
    assert reasons[2] == "column 'x' is integer in table t, activity sends float"
    assert "invalid column name" in reasons[8]
    assert reasons[9] == reasons[0]
    assert kinds(plan) == ["InsertRows"] and plan.steps[0].canonical_values() == {"x": [9]}


def test_conflict_with_column_added_earlier_in_same_plan() -> None:
    plan = plan_table("t", None, [env("t", ins("t", [("a", "integer")], [1])), env("t", ins("t", [("A", "date")], ["2024-01-01"]))])
    assert [r.reason for r in plan.rejections] == ["column 'a' is integer in table t, activity sends date"]
    assert plan.rows_to_insert == 1


def test_delete_on_missing_table_is_noop_until_created() -> None:
    c = [("k", "integer")]
    plan = plan_table("t", None, [env("t", dele("t", c, [1]), dele("t", [("other", "string")], ["x"]), ins("t", c, [1]), dele("t", c, [1]))])
    assert plan.noop_deletes == 2 and plan.rejections == []
    assert kinds(plan) == ["CreateTable", "InsertRows", "DeleteRows"]


def test_empty() -> None:
    plan = plan_table("t", None, [])
    assert plan.steps == [] and plan.schema is None


# --------------------------------------------------------------------------- property


def _naive(schema: dict | None, envelopes: list[Envelope]) -> tuple[list[dict], list[int], int]:
    """Row-at-a-time reference: table rows as dicts (lowercased names), rejected indexes, no-op deletes."""
    rows: list[dict] = []
    cols = dict(schema or {})
    exists = schema is not None
    rejected: list[int] = []
    noop = 0
    for e in envelopes:
        for i, a in enumerate(e.activities):
            lows = [n.lower() for n in a.col_names]
            if a.operation == "insert":
                if any(low in cols and cols[low][1] != t for low, t in zip(lows, a.col_types)):
                    rejected.append(i)
                    continue
                for n, low, t in zip(a.col_names, lows, a.col_types):
                    cols.setdefault(low, (n, t))
                exists = True
                rows.append(dict(zip(lows, a.col_values)))
            else:
                if not exists:
                    noop += 1
                    continue
                if any(low not in cols or cols[low][1] != t for low, t in zip(lows, a.col_types)):
                    rejected.append(i)
                    continue
                rows = [r for r in rows if not all(r.get(low) == v for low, v in zip(lows, a.col_values))]
    return rows, rejected, noop


_columns = st.sampled_from([("a", "integer"), ("A", "integer"), ("b", "string"), ("c", "integer"), ("b", "integer")])


@st.composite
def _activity(draw: Any) -> Activity:
    cols = draw(st.lists(_columns, min_size=1, max_size=3, unique_by=lambda c: c[0].lower()))
    values = [draw(st.one_of(st.none(), st.integers(0, 2))) if t == "integer" else draw(st.sampled_from([None, "x", "y"])) for _, t in cols]
    op = draw(st.sampled_from(["insert", "insert", "delete"]))
    return Activity(op, "t", [c for c, _ in cols], [t for _, t in cols], values)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_activity(), min_size=1, max_size=6), max_size=5), st.booleans())
def test_plan_matches_row_at_a_time(batches: list[list[Activity]], table_exists: bool) -> None:
    schema = {"a": ("a", "integer")} if table_exists else None
    envelopes = [Envelope(f"b:t:{n}", "t", acts) for n, acts in enumerate(batches)]
    plan = plan_table("t", schema, envelopes)
    want_rows, want_rejected, want_noop = _naive(schema, envelopes)
    assert canon(execute(plan.steps)) == canon(want_rows)
    assert [r.index for r in plan.rejections] == want_rejected
    assert plan.noop_deletes == want_noop


# --- v2 envelopes (columnar runs) plan exactly like v1 envelopes (activities) -----------

_typed_values = {
    "integer": st.one_of(st.none(), st.integers(0, 2)),
    "string": st.sampled_from([None, "x", "y"]),
    "timestamp": st.sampled_from([None, "2026-01-02T03:04:05.000006Z", "1970-01-01T00:00:00.000000Z"]),
    "numeric": st.sampled_from([None, "0", "-1.5", "12345678901234567890123456789.123456789"]),
}
_typed_columns = st.sampled_from(
    [("a", "integer"), ("A", "integer"), ("b", "string"), ("b", "integer"), ("ts", "timestamp"), ("n", "numeric"), ("1x", "string")]
)


@st.composite
def _typed_activity(draw: Any) -> Activity:
    # the API refuses an activity without columns; a run of them has no rows to carry
    cols = draw(st.lists(_typed_columns, min_size=1, max_size=3, unique_by=lambda c: c[0]))
    values = [draw(_typed_values[t]) for _, t in cols]
    op = draw(st.sampled_from(["insert", "insert", "delete", "upsert"]))
    return Activity(op, "t", [c for c, _ in cols], [t for _, t in cols], values)  # type: ignore[arg-type]


def _steps_as_data(plan: Plan) -> list[tuple]:
    out: list[tuple] = []
    for step in plan.steps:
        if isinstance(step, InsertRows):
            assert step.table.schema.names == [n for n, _ in step.columns]
            assert step.table.schema.types == [TYPES[t].arrow_type for _, t in step.columns]
            out.append(("insert", step.columns, step.canonical_values(), step.source_rows()))
        elif isinstance(step, DeleteRows):
            out.append(("delete", step.conditions))
        else:
            out.append((type(step).__name__, step.columns))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_typed_activity(), min_size=1, max_size=6), max_size=5), st.booleans())
def test_runs_plan_like_activities(batches: list[list[Activity]], table_exists: bool) -> None:
    schema = {"a": ("a", "integer"), "ts": ("ts", "timestamp")} if table_exists else None
    v1 = [Envelope(f"b:t:{n}", "t", acts) for n, acts in enumerate(batches)]
    v2 = [Envelope(f"b:t:{n}", "t", runs=runs_of(acts)) for n, acts in enumerate(batches)]
    by_activities = plan_table("t", schema, v1)
    by_runs = plan_table("t", schema, v2)
    assert _steps_as_data(by_runs) == _steps_as_data(by_activities)
    assert by_runs.rejections == by_activities.rejections
    assert (by_runs.noop_deletes, by_runs.deletes, by_runs.rows_to_insert, by_runs.schema_changes, by_runs.schema) == (
        by_activities.noop_deletes,
        by_activities.deletes,
        by_activities.rows_to_insert,
        by_activities.schema_changes,
        by_activities.schema,
    )
    # every insert that was not rejected is a row, in order, traced to its activity
    rejected = {(r.dedup_id, r.index) for r in by_runs.rejections}
    inserted = [
        (e.dedup_id, i)
        for e in v1
        for i, a in enumerate(e.activities)
        if a.operation == "insert" and (e.dedup_id, i) not in rejected
    ]
    assert [s for step in by_runs.steps if isinstance(step, InsertRows) for s in step.source_rows()] == inserted


def test_run_in_the_wrong_arrow_type_is_rejected_whole() -> None:
    run = runs_of([ins("t", [("x", "integer")], [1]), ins("t", [("x", "integer")], [2])])[0]
    run.batch = pa.RecordBatch.from_arrays([pa.array(["1", "2"])], names=["0"])
    plan = plan_table("t", None, [Envelope("b:t:0", "t", runs=[run])])
    assert kinds(plan) == []
    assert [(r.index, r.reason) for r in plan.rejections] == [
        (0, "column 'x' carries Arrow string, integer is int64"),
        (1, "column 'x' carries Arrow string, integer is int64"),
    ]


# --- upserts ---


def test_upserts_inserts_and_deletes_are_barriers_to_each_other_and_the_first_upsert_fixes_the_key():
    from app.warehouse.plan import UpsertRows
    from tests.support.builders import ups

    c = [("id", "integer"), ("v", "string")]
    plan = plan_table("t", None, [env("t", ins("t", c, [1, "a"]), ups("t", c, [1, "b"], ["id"]), ups("t", c, [2, "c"], ["ID"]),
                                       dele("t", c[:1], [2]), ins("t", c, [3, "d"]))], upserts=True)
    assert [type(s).__name__ for s in plan.steps] == ["CreateTable", "InsertRows", "UpsertRows", "DeleteRows", "UpsertRows"]
    assert plan.steps[0].key is None  # rows were inserted before the key: not declared
    assert plan.new_key == ("id",) and plan.schema.key == ("id",)
    assert isinstance(plan.steps[2], UpsertRows) and plan.steps[2].count == 2 and plan.rows_to_upsert == 3


def test_a_table_created_by_an_upsert_declares_its_key_and_the_last_row_of_a_key_wins():
    from tests.support.builders import ups

    c = [("id", "integer"), ("v", "string")]
    plan = plan_table("t", None, [env("t", ups("t", c, [1, "a"], ["id"]), ups("t", c, [2, "b"], ["id"])),
                                  env("t", ups("t", c, [1, "c"], ["id"]))], upserts=True)
    assert plan.steps[0].key == ("id",)
    assert plan.steps[1].last_per_key().to_pylist() == [{"id": 2, "v": "b"}, {"id": 1, "v": "c"}]


def test_without_the_capability_every_upsert_is_rejected_and_adds_nothing():
    from tests.support.builders import ups

    plan = plan_table("t", None, [env("t", ups("t", [("id", "integer")], [1], ["id"]))])
    assert [r.reason for r in plan.rejections] == ["this warehouse does not apply upserts"]
    assert plan.steps == [] and plan.schema is None
