"""The upsert contract (issue 17), backend-neutral: only the `Warehouse` interface and `read_rows`.

Runs on every backend that declares `capabilities.upserts`, each case with the
activities as v1 (per-activity) and as v2 (columnar runs) envelopes; a backend that
does not upsert must reject every upsert and write nothing.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.messages.envelope import Envelope
from app.schema.activity import KEY_TYPES, Activity
from app.schema.columnar import runs_of
from tests.support.builders import dele, ins, ups
from tests.support.reference import ActivityModel, canon
from tests.warehouse.conftest import BACKENDS, Backend
from tests.warehouse.test_contract import ROUND_TRIP

# Backends that apply upserts (BigQuery over bqemulator: one MERGE per run, docs/google-cloud.md).
UPSERT_BACKENDS = ["duckdb", "memory", "bigquery"]
COLS = [("id", "integer"), ("v", "string")]


@pytest.fixture(params=[(name, form) for name in UPSERT_BACKENDS for form in ("activities", "runs")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def keyed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Backend, str]]:
    name, form = request.param
    b = BACKENDS[name](tmp_path)
    assert b.warehouse.capabilities.upserts
    try:
        yield b, form
    finally:
        b.close()


def envelope(form: str, table: str, *activities: Activity, dedup_id: str | None = None) -> Envelope:
    dedup_id = dedup_id or f"{uuid.uuid4().hex}:{table}:0"
    if form == "runs":
        return Envelope(dedup_id, table, runs=runs_of(activities))
    return Envelope(dedup_id, table, list(activities))


def apply(keyed: tuple[Backend, str], table: str, *messages: list[Activity] | Envelope):
    backend, form = keyed
    envs = [m if isinstance(m, Envelope) else envelope(form, table, *m) for m in messages]
    return backend.warehouse.apply(table, envs)


def rows(keyed: tuple[Backend, str], table: str, cols=COLS) -> list[tuple]:
    return sorted(keyed[0].read_rows(table, list(cols)), key=repr)


def test_every_exact_type_can_be_a_key(keyed, table: str) -> None:
    backend, _ = keyed
    for typ in sorted(KEY_TYPES):
        t = f"{table}_{typ}"
        cols = [("k", typ), ("v", "integer")]
        (a, a_read), (b, b_read) = ROUND_TRIP[typ][:2]
        result = apply(keyed, t, [ups(t, cols, [a, 1], ["k"]), ups(t, cols, [b, 2], ["k"])], [ups(t, cols, [a, 3], ["k"])])
        assert result.rejections == []
        assert sorted(backend.read_rows(t, cols), key=repr) == sorted([(a_read, 3), (b_read, 2)], key=repr), typ


def test_a_two_column_key(keyed, table: str) -> None:
    cols = [("a", "integer"), ("b", "string"), ("v", "integer")]
    key = ["a", "b"]
    apply(keyed, table, [ups(table, cols, [1, "x", 1], key), ups(table, cols, [1, "y", 2], key)])
    apply(keyed, table, [ups(table, cols, [1, "x", 3], key), ups(table, cols, [2, "x", 4], ["B", "A"])])
    assert rows(keyed, table, cols) == [(1, "x", 3), (1, "y", 2), (2, "x", 4)]


def test_upsert_after_inserts_replaces_every_row_of_the_key_and_then_inserts_upsert(keyed, table: str) -> None:
    apply(keyed, table, [ins(table, COLS, [1, "a"]), ins(table, COLS, [1, "b"]), ins(table, COLS, [2, "c"])])
    result = apply(keyed, table, [ups(table, COLS, [1, "new"], ["id"])])
    assert result.rejections == [] and result.rows_upserted == 1
    assert rows(keyed, table) == [(1, "new"), (2, "c")]
    apply(keyed, table, [ins(table, COLS, [2, "again"]), ins(table, COLS, [3, "d"])])  # keyed now: upserts
    assert rows(keyed, table) == [(1, "new"), (2, "again"), (3, "d")]


def test_an_insert_on_a_keyed_table_must_send_the_key(keyed, table: str) -> None:
    apply(keyed, table, [ups(table, COLS, [1, "a"], ["id"])])
    result = apply(keyed, table, [ins(table, [("v", "string")], ["no key"]), ins(table, COLS, [None, "null key"])])
    assert [r.index for r in result.rejections] == [0, 1]
    assert "must send column 'id'" in result.rejections[0].reason and "is null" in result.rejections[1].reason
    assert rows(keyed, table) == [(1, "a")]


def test_upsert_delete_upsert_in_one_message_and_across_messages(keyed, table: str) -> None:
    one = [ups(table, COLS, [1, "a"], ["id"]), dele(table, [("id", "integer")], [1]), ups(table, COLS, [1, "b"], ["id"])]
    apply(keyed, table, one)
    assert rows(keyed, table) == [(1, "b")]
    apply(keyed, table, [dele(table, [("v", "string")], ["b"])], [ups(table, COLS, [1, "c"], ["id"])])
    assert rows(keyed, table) == [(1, "c")]
    apply(keyed, table, [ups(table, COLS, [2, "d"], ["id"])], [dele(table, [("id", "integer")], [2])])  # upsert before delete
    assert rows(keyed, table) == [(1, "c")]


def test_the_later_upsert_of_a_key_wins_in_a_message_across_messages_and_across_applies(keyed, table: str) -> None:
    apply(keyed, table, [ups(table, COLS, [1, "a"], ["id"]), ups(table, COLS, [2, "x"], ["id"]), ups(table, COLS, [1, "b"], ["id"])])
    assert rows(keyed, table) == [(1, "b"), (2, "x")]
    apply(keyed, table, [ups(table, COLS, [1, "c"], ["id"])], [ups(table, COLS, [1, "d"], ["id"])])
    apply(keyed, table, [ups(table, COLS, [2, "y"], ["id"])])
    assert rows(keyed, table) == [(1, "d"), (2, "y")]


def test_another_key_is_refused_and_changes_nothing(keyed, table: str) -> None:
    apply(keyed, table, [ups(table, COLS, [1, "a"], ["id"])])
    result = apply(keyed, table, [ups(table, COLS, [1, "other"], ["v"]), ups(table, COLS, [1, "wider"], ["id", "v"]),
                                  ups(table, COLS, [2, "fine"], ["ID"])])
    assert [r.index for r in result.rejections] == [0, 1]
    assert "has the key (id)" in result.rejections[0].reason
    assert "adding a column to the key" in result.rejections[1].reason
    assert rows(keyed, table) == [(1, "a"), (2, "fine")]


def test_a_new_column_on_a_keyed_table_and_the_whole_row_is_replaced(keyed, table: str) -> None:
    backend, _ = keyed
    apply(keyed, table, [ups(table, COLS, [1, "a"], ["id"])])
    wide = [*COLS, ("w", "integer")]
    apply(keyed, table, [ups(table, wide, [2, "b", 20], ["id"])])
    apply(keyed, table, [ups(table, [("id", "integer"), ("w", "integer")], [1, 10], ["id"])])
    assert backend.warehouse.table_schema(table) == {"id": "integer", "v": "string", "w": "integer"}
    assert rows(keyed, table, wide) == [(1, None, 10), (2, "b", 20)]


def test_a_replayed_message_changes_nothing(keyed, table: str) -> None:
    _, form = keyed
    first = envelope(form, table, ups(table, COLS, [1, "old"], ["id"]), dedup_id="b1:t:0")
    apply(keyed, table, first)
    apply(keyed, table, [ups(table, COLS, [1, "new"], ["id"])])
    again = envelope(form, table, ups(table, COLS, [1, "old"], ["id"]), dedup_id="b1:t:0")
    result = apply(keyed, table, again)
    assert result.skipped_duplicates == 1 and result.rows_upserted == 0
    assert rows(keyed, table) == [(1, "new")]


def test_a_key_type_that_does_not_compare_exactly_is_rejected(keyed, table: str) -> None:
    result = apply(keyed, table, [ups(table, [("f", "float"), ("v", "string")], [1.5, "x"], ["f"])])
    assert len(result.rejections) == 1 and "does not compare exactly" in result.rejections[0].reason
    assert keyed[0].warehouse.table_schema(table) is None


@pytest.mark.parametrize("name", list(BACKENDS))
def test_upserts_apply_exactly_where_the_backend_says_so(name: str, tmp_path: Path) -> None:
    backend = BACKENDS[name](tmp_path)
    try:
        table = "t_" + uuid.uuid4().hex[:12]
        result = backend.warehouse.apply(table, [envelope("activities", table, ups(table, COLS, [1, "a"], ["id"]))])
        if backend.warehouse.capabilities.upserts:
            assert result.rejections == [] and backend.read_rows(table, COLS) == [(1, "a")]
        else:  # dead-lettered with the reason, nothing written
            assert [r.reason for r in result.rejections] == ["this warehouse does not apply upserts"]
            assert backend.warehouse.table_schema(table) is None
    finally:
        backend.close()


# --- property: random insert/upsert/delete on a few keys, against the plain-Python model ---

_OPS = st.tuples(
    st.sampled_from(["upsert", "upsert", "insert", "delete", "delete_v"]),
    st.integers(0, 3),  # the key
    st.sampled_from(["a", "b", None]),  # the value
    st.booleans(),  # upsert: also send the column w
)


@st.composite
def _messages(draw: Any) -> list[list[tuple]]:
    ops = draw(st.lists(_OPS, min_size=1, max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(ops)), max_size=4)))
    bounds = [0, *cuts, len(ops)]
    return [ops[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _activity(table: str, op: tuple) -> Activity:
    kind, key, value, wide = op
    if kind == "delete":
        return dele(table, [("id", "integer")], [key])
    if kind == "delete_v":
        return dele(table, [("v", "string")], [value])
    cols = [*COLS, ("w", "integer")] if wide else COLS
    values = [key, value, key * 10] if wide else [key, value]
    return ups(table, cols, values, ["id"]) if kind == "upsert" else ins(table, cols, values)


@pytest.mark.parametrize("name", UPSERT_BACKENDS)
@pytest.mark.parametrize("form", ["activities", "runs"])
def test_random_sequences_end_as_the_model_says(name: str, form: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    backend = BACKENDS[name](tmp_path_factory.mktemp("prop"))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(messages=_messages(), per_apply=st.integers(1, 3))
    def check(messages: list[list[tuple]], per_apply: int) -> None:
        table = "t_" + uuid.uuid4().hex[:12]
        model = ActivityModel()
        envs = []
        for ops in messages:
            acts = [_activity(table, op) for op in ops]
            for a in acts:
                model.apply(a)
            envs.append(envelope(form, table, *acts))
        for start in range(0, len(envs), per_apply):
            backend.warehouse.apply(table, envs[start : start + per_apply])
        schema = backend.warehouse.table_schema(table)
        got = [] if schema is None else [dict(zip(schema, r)) for r in backend.read_rows(table, list(schema.items()))]
        assert canon(got) == canon(model.rows)

    try:
        check()
    finally:
        backend.close()


def test_upserts_of_several_tables_in_one_apply_many(keyed, table: str) -> None:
    backend, form = keyed
    a, b, c = f"{table}_a", f"{table}_b", f"{table}_c"
    apply(keyed, c, [ups(c, COLS, [1, "c"], ["id"])])
    outcomes = backend.warehouse.apply_many([
        (a, [envelope(form, a, ups(a, COLS, [1, "x"], ["id"]), ups(a, COLS, [1, "y"], ["id"]))]),
        (b, [envelope(form, b, ins(b, COLS, [1, "p"]), ins(b, COLS, [1, "q"]))]),
        (c, [envelope(form, c, ups(c, COLS, [2, "z"], ["v"]), ins(c, COLS, [1, "d"]))]),  # another key: refused
    ])
    assert [len(o.rejections) for o in outcomes] == [0, 0, 1]
    assert rows(keyed, a) == [(1, "y")] and rows(keyed, b) == [(1, "p"), (1, "q")] and rows(keyed, c) == [(1, "d")]
