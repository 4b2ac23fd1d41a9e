"""The warehouse contract, backend-neutral: only the `Warehouse` interface and `read_rows`."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from app.schema.activity import Activity
from app.schema.columnar import runs_of
from app.schema.types import TYPE_NAMES
from app.warehouse.base import Envelope
from tests.support.builders import dele, env, ins

if TYPE_CHECKING:
    from tests.warehouse.conftest import Backend

UTC = dt.timezone.utc
BIG = "-" + "9" * 38 + "." + "1234567890" * 3 + "12345678"  # 38 + 38 digits

# type -> [(canonical value sent, expected normalized value read back)]
ROUND_TRIP: dict[str, list[tuple[Any, Any]]] = {
    "string": [("plain", "plain"), ("quote ' \" ; -- /* x */ é 𝄞", "quote ' \" ; -- /* x */ é 𝄞"), ("", "")],
    "bytes": [(base64.b64encode(b"\x00\xff\x10bin").decode(), b"\x00\xff\x10bin"), ("", b"")],
    "integer": [(-(2**63), -(2**63)), (2**63 - 1, 2**63 - 1), (0, 0)],
    "float": [(1.5, 1.5), (-0.1, -0.1), ("NaN", "NaN"), ("Infinity", float("inf")), ("-Infinity", float("-inf"))],
    "numeric": [
        ("-12345678901234567890123456789.123456789", Decimal("-12345678901234567890123456789.123456789")),
        ("0.000000001", Decimal("0.000000001")),
        ("42", Decimal(42)),
    ],
    "bignumeric": [(BIG, Decimal(BIG)), ("0." + "0" * 37 + "1", Decimal("1e-38"))],
    "boolean": [(True, True), (False, False)],
    "timestamp": [
        ("2024-02-29T23:59:59.123456Z", dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)),
        ("1970-01-01T00:00:00.000000Z", dt.datetime(1970, 1, 1, tzinfo=UTC)),
    ],
    "date": [("2024-02-29", dt.date(2024, 2, 29)), ("0001-01-01", dt.date(1, 1, 1)), ("9999-12-31", dt.date(9999, 12, 31))],
    "time": [("23:59:59.999999", dt.time(23, 59, 59, 999999)), ("00:00:00", dt.time(0))],
    "datetime": [
        ("2024-01-02T03:04:05.000001", dt.datetime(2024, 1, 2, 3, 4, 5, 1)),
        ("1999-12-31T23:59:59", dt.datetime(1999, 12, 31, 23, 59, 59)),
    ],
    "geography": [
        # expected WKT goes through the same normalization as what is read back
        ("POINT(1.5 -2.25)", "POINT(1.5 -2.25)"),
        ("LINESTRING(0 0, 1 1, 2 0)", "LINESTRING (0 0, 1 1, 2 0)"),
    ],
    "record": [
        ({"a": 1, "b": [1, 2, {"c": None}], "s": "x'y"}, {"a": 1, "b": [1, 2, {"c": None}], "s": "x'y"}),
        ({}, {}),
    ],
}


def test_round_trip_covers_every_type() -> None:
    assert set(ROUND_TRIP) == set(TYPE_NAMES)


def ids(backend: Backend, table: str) -> list[int]:
    return sorted(r[0] for r in backend.read_rows(table, [("id", "integer")]))


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_type_round_trip_and_null(backend: Backend, table: str, typ: str) -> None:
    cols = [("id", "integer"), ("v", typ)]
    cases = ROUND_TRIP[typ] + [(None, None)]
    result = backend.warehouse.apply(table, [env(table, *(ins(table, cols, [i, sent]) for i, (sent, _) in enumerate(cases)))])
    assert result.rejections == []
    assert result.rows_inserted == len(cases)
    assert backend.warehouse.table_schema(table) == {"id": "integer", "v": typ}
    got = dict(backend.read_rows(table, cols))
    if typ == "geography":
        cases = [(sent, backend.normalize(typ, expected)) for sent, expected in cases]
    assert got == {i: expected for i, (_, expected) in enumerate(cases)}


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_delete_by_each_type(backend: Backend, table: str, typ: str) -> None:
    cols = [("id", "integer"), ("v", typ)]
    cases = ROUND_TRIP[typ] + [(None, None)]
    wh = backend.warehouse
    wh.apply(table, [env(table, *(ins(table, cols, [i, sent]) for i, (sent, _) in enumerate(cases)))])
    # delete the first value and the null by the typed column only
    result = wh.apply(table, [env(table, dele(table, [("v", typ)], [cases[0][0]]), dele(table, [("v", typ)], [None]))])
    assert result.rejections == []
    assert result.rows_deleted == 2
    assert ids(backend, table) == list(range(1, len(cases) - 1))


def test_insert_and_delete_multi_column_with_null(backend: Backend, table: str) -> None:
    cols = [("id", "integer"), ("name", "string"), ("team", "string")]
    rows = [[1, "ann", "a"], [2, "bob", None], [3, "bob", "b"], [4, "cy", None]]
    wh = backend.warehouse
    assert wh.table_schema(table) is None
    r = wh.apply(table, [env(table, *(ins(table, cols, row) for row in rows))])
    assert (r.rows_inserted, r.schema_changes, r.applied_envelopes) == (4, 1, 1)
    # (name = bob AND team IS NULL) deletes only row 2; (id=1, name=ann) deletes row 1; no match deletes none
    r = wh.apply(
        table,
        [
            env(
                table,
                dele(table, [("name", "string"), ("team", "string")], ["bob", None]),
                dele(table, [("id", "integer"), ("name", "string")], [1, "ann"]),
                dele(table, [("id", "integer"), ("name", "string")], [3, "nobody"]),
            )
        ],
    )
    assert r.rows_deleted == 2 and r.rejections == []
    assert ids(backend, table) == [3, 4]


def test_insert_delete_insert_order_in_one_apply(backend: Backend, table: str) -> None:
    cols = [("id", "integer"), ("k", "string")]
    e1 = env(table, ins(table, cols, [1, "x"]), ins(table, cols, [2, "y"]))
    e2 = env(table, dele(table, [("k", "string")], ["x"]), ins(table, cols, [3, "x"]), ins(table, cols, [4, "z"]))
    e3 = env(table, dele(table, [("k", "string")], ["z"]))
    r = backend.warehouse.apply(table, [e1, e2, e3])
    assert (r.rows_inserted, r.rows_deleted, r.applied_envelopes) == (4, 2, 3)
    assert backend.read_rows(table, cols) and sorted(backend.read_rows(table, cols)) == [(2, "y"), (3, "x")]


def test_schema_evolution_adds_columns(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    wh.apply(table, [env(table, ins(table, [("id", "integer")], [1]))])
    r = wh.apply(
        table,
        [
            env(table, ins(table, [("id", "integer"), ("note", "string")], [2, "n"])),
            env(table, ins(table, [("ID", "integer"), ("when", "date"), ("Note", "string")], [3, "2024-01-01", None])),
        ],
    )
    assert r.rejections == [] and r.schema_changes == 2 and r.rows_inserted == 2
    assert wh.table_schema(table) == {"id": "integer", "note": "string", "when": "date"}
    rows = sorted(backend.read_rows(table, [("id", "integer"), ("note", "string"), ("when", "date")]))
    assert rows == [(1, None, None), (2, "n", None), (3, None, dt.date(2024, 1, 1))]
    # a delete on a column added in the same apply
    r = wh.apply(table, [env(table, ins(table, [("id", "integer"), ("flag", "boolean")], [4, True]),
                         dele(table, [("flag", "boolean")], [True]))])
    assert r.rows_deleted == 1 and ids(backend, table) == [1, 2, 3]


def test_type_conflict_is_rejected_rest_applies(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    wh.apply(table, [env(table, ins(table, [("id", "integer"), ("x", "integer")], [1, 1]))])
    e = env(
        table,
        ins(table, [("id", "integer"), ("x", "integer")], [2, 2]),
        ins(table, [("id", "integer"), ("x", "string")], [3, "three"]),
        ins(table, [("id", "integer")], [4]),
    )
    r = wh.apply(table, [e])
    assert r.rows_inserted == 2
    assert [(j.dedup_id, j.index) for j in r.rejections] == [(e.dedup_id, 1)]
    assert r.rejections[0].reason == f"column 'x' is integer in table {table}, activity sends string"
    assert ids(backend, table) == [1, 2, 4]
    assert wh.table_schema(table) == {"id": "integer", "x": "integer"}


def test_delete_unknown_column_is_rejected(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    wh.apply(table, [env(table, ins(table, [("id", "integer")], [1]), ins(table, [("id", "integer")], [2]))])
    e = env(table, dele(table, [("nope", "integer")], [1]), dele(table, [("id", "integer")], [2]))
    r = wh.apply(table, [e])
    assert [(j.index, j.activity.operation) for j in r.rejections] == [(0, "delete")]
    assert "nope" in r.rejections[0].reason
    assert r.rows_deleted == 1 and ids(backend, table) == [1]


def test_delete_on_missing_table_is_noop(backend: Backend, table: str) -> None:
    r = backend.warehouse.apply(table, [env(table, dele(table, [("id", "integer")], [1]))])
    assert (r.noop_deletes, r.rows_deleted, r.rejections, r.applied_envelopes) == (1, 0, [], 1)
    assert backend.warehouse.table_schema(table) is None


def test_redelivery_applies_once(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    e = env(table, ins(table, [("id", "integer")], [1]), ins(table, [("id", "integer")], [2]))
    first = wh.apply(table, [e])
    assert (first.applied_envelopes, first.skipped_duplicates, first.rows_inserted) == (1, 0, 2)
    again = wh.apply(table, [e, env(table, ins(table, [("id", "integer")], [3]))])
    assert (again.applied_envelopes, again.skipped_duplicates, again.rows_inserted) == (1, 1, 1)
    assert ids(backend, table) == [1, 2, 3]
    # the same dedup_id twice inside one call also applies once
    e4 = env(table, ins(table, [("id", "integer")], [4]))
    twice = wh.apply(table, [e4, e4])
    assert (twice.applied_envelopes, twice.skipped_duplicates) == (1, 1)
    assert ids(backend, table) == [1, 2, 3, 4]


def test_mixed_column_sets_merge(backend: Backend, table: str) -> None:
    acts = []
    for i in range(300):
        if i % 3 == 0:
            acts.append(ins(table, [("id", "integer"), ("a", "string")], [i, f"a{i}"]))
        elif i % 3 == 1:
            acts.append(ins(table, [("b", "float"), ("id", "integer")], [i / 2, i]))
        else:
            acts.append(ins(table, [("id", "integer")], [i]))
    r = backend.warehouse.apply(table, [env(table, *acts[:150]), env(table, *acts[150:])])
    assert r.rows_inserted == 300 and r.rejections == []
    rows = sorted(backend.read_rows(table, [("id", "integer"), ("a", "string"), ("b", "float")]))
    assert rows == [
        (i, f"a{i}" if i % 3 == 0 else None, i / 2 if i % 3 == 1 else None) for i in range(300)
    ]


def _every_type_activities(table: str) -> list[Activity]:
    """Inserts of every type (nulls too), a type conflict, deletes (one unknown column) and
    a narrower insert after them: what a v2 message must apply exactly like a v1 one."""
    cols = [("id", "integer")] + [(f"v_{t}", t) for t in TYPE_NAMES]
    rows = [[k] + [ROUND_TRIP[t][k % len(ROUND_TRIP[t])][0] for t in TYPE_NAMES] for k in range(3)]
    rows.append([3] + [None] * len(TYPE_NAMES))
    acts = [ins(table, cols, row) for row in rows]
    acts.append(ins(table, [("id", "integer"), ("v_integer", "string")], [9, "x"]))  # type conflict
    acts.append(dele(table, [("id", "integer")], [1]))
    acts.append(dele(table, [("nope", "integer")], [1]))  # unknown column
    acts.append(ins(table, [("id", "integer"), ("v_string", "string")], [4, "after the delete"]))
    return acts


def test_columnar_envelope_applies_like_activities(backend: Backend, table: str) -> None:
    """The same activities as a v1 envelope (activities) and a v2 one (columnar runs)."""
    by_runs_table = table + "_runs"
    cols = [("id", "integer")] + [(f"v_{t}", t) for t in TYPE_NAMES]
    v1 = backend.warehouse.apply(table, [env(table, *_every_type_activities(table))])
    v2_id = f"{uuid.uuid4().hex}:{by_runs_table}:0"
    v2 = backend.warehouse.apply(
        by_runs_table, [Envelope(v2_id, by_runs_table, runs=runs_of(_every_type_activities(by_runs_table)))]
    )
    assert (v2.rows_inserted, v2.rows_deleted, v2.schema_changes) == (v1.rows_inserted, v1.rows_deleted, v1.schema_changes) == (5, 1, 1)
    assert [(r.index, r.activity.col_names, r.activity.col_values) for r in v2.rejections] == [
        (r.index, r.activity.col_names, r.activity.col_values) for r in v1.rejections
    ] == [(4, ["id", "v_integer"], [9, "x"]), (6, ["nope"], [1])]
    assert [r.reason.replace(by_runs_table, table) for r in v2.rejections] == [r.reason for r in v1.rejections]
    assert backend.warehouse.table_schema(by_runs_table) == backend.warehouse.table_schema(table)
    assert sorted(backend.read_rows(by_runs_table, cols)) == sorted(backend.read_rows(table, cols))
    assert sorted(r[0] for r in backend.read_rows(table, cols)) == [0, 2, 3, 4]


# --------------------------------------------------------------------------- reads


def test_query_binds_positional_params_and_unpacks_as_columns_and_rows(backend: Backend, table: str) -> None:
    cols = [("id", "integer"), ("s", "string")]
    backend.warehouse.apply(table, [env(table, ins(table, cols, [1, "a"]), ins(table, cols, [2, "b"]))])
    columns, rows = backend.warehouse.query(f"SELECT id FROM {backend.table_sql(table)} WHERE s = ? AND id > ?", ["b", 0])
    assert columns == ["id"] and rows == [(2,)]


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_query_types_are_activity_types(backend: Backend, table: str, typ: str) -> None:
    cols = [("id", "integer"), ("v", typ)]
    backend.warehouse.apply(table, [env(table, ins(table, cols, [1, ROUND_TRIP[typ][0][0]]))])
    result = backend.warehouse.query(f"SELECT id, v FROM {backend.table_sql(table)}")
    mapper = backend.warehouse.type_mapper
    stored_as = mapper.activity_type_of(mapper.column_type(typ))  # a shared column reads as its first type
    assert result.types == ["integer", stored_as]
    assert stored_as == typ or typ in mapper.shared


@pytest.mark.parametrize(
    "statement",
    ["DELETE FROM {t} WHERE TRUE", "INSERT INTO {t} (id) VALUES (9)", "DROP TABLE {t}", "UPDATE {t} SET id = 0 WHERE TRUE"],
    ids=["delete", "insert", "drop", "update"],
)
def test_query_refuses_a_write_and_changes_nothing(backend: Backend, table: str, statement: str) -> None:
    from app.warehouse.base import WarehouseQueryError

    backend.warehouse.apply(table, [env(table, ins(table, [("id", "integer")], [1]))])
    with pytest.raises(WarehouseQueryError):
        backend.warehouse.query(statement.format(t=backend.table_sql(table)))
    assert ids(backend, table) == [1]


def test_query_errors_are_warehouse_query_errors(backend: Backend, table: str) -> None:
    from app.warehouse.base import WarehouseQueryError

    backend.warehouse.apply(table, [env(table, ins(table, [("id", "integer")], [1]))])
    with pytest.raises(WarehouseQueryError):
        backend.warehouse.query(f"SELECT nope FROM {backend.table_sql(table)}")
    with pytest.raises(WarehouseQueryError):
        backend.warehouse.query(f"SELECT id FROM {backend.table_sql(table + '_missing')}")
    with pytest.raises(WarehouseQueryError):
        backend.warehouse.query("SELEC 1")


def test_list_tables_are_the_user_tables_sorted(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    assert wh.list_tables() == []
    later, earlier = table + "_b", table + "_a"
    wh.apply(later, [env(later, ins(later, [("id", "integer")], [1]))])
    wh.apply(earlier, [env(earlier, ins(earlier, [("id", "integer")], [1]))])
    missing = table + "_c"
    wh.apply(missing, [env(missing, dele(missing, [("id", "integer")], [1]))])  # a no-op creates nothing
    # the backends' own bookkeeping (dedup markers, column types) is not listed
    assert wh.list_tables() == [earlier, later]


def test_count_rows_counts_exactly_the_tables_asked(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    other, untouched = table + "_other", table + "_untouched"
    cols = [("id", "integer")]
    wh.apply(table, [env(table, *(ins(table, cols, [i]) for i in range(5)), dele(table, cols, [0]))])
    wh.apply(other, [env(other, ins(other, cols, [1]))])
    wh.apply(untouched, [env(untouched, ins(untouched, cols, [1]))])
    assert wh.count_rows([table, other]) == {table: 4, other: 1}
    wh.apply(other, [env(other, dele(other, cols, [1]))])
    assert wh.count_rows([other]) == {other: 0}


def test_ready_once_it_has_applied(backend: Backend, table: str) -> None:
    backend.warehouse.apply(table, [env(table, ins(table, [("id", "integer")], [1]))])
    assert backend.warehouse.ready() == (True, "ok")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["_ingest_user", "_INGEST_Other", "bad-name", "t; DROP TABLE t"])
def test_internal_and_invalid_table_names_are_refused(backend: Backend, name: str) -> None:
    """The API refuses these names already; a warehouse refuses them again (its own
    bookkeeping tables start with `_ingest_`). Naming rules beyond these are per backend."""
    wh = backend.warehouse
    e = env(name, ins(name, [("id", "integer")], [1]), dele(name, [("id", "integer")], [1]))
    r = wh.apply(name, [e])
    assert [(j.dedup_id, j.index) for j in r.rejections] == [(e.dedup_id, 0), (e.dedup_id, 1)]
    assert r.rows_inserted == 0 and r.rows_deleted == 0
    assert wh.table_schema(name) is None and wh.list_tables() == []


# --------------------------------------------------------------------------- exactly once, order, errors


def test_an_envelope_with_a_rejection_is_recorded_once_like_any_other(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    wh.apply(table, [env(table, ins(table, [("id", "integer")], [1]))])
    e = env(table, ins(table, [("id", "string")], ["x"]), ins(table, [("id", "integer")], [2]))
    first = wh.apply(table, [e])
    assert [j.index for j in first.rejections] == [0] and first.rows_inserted == 1
    again = wh.apply(table, [e])
    assert (again.skipped_duplicates, again.applied_envelopes, again.rejections) == (1, 0, [])
    assert ids(backend, table) == [1, 2]


def test_envelopes_apply_in_the_order_given_across_calls(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    cols = [("id", "integer"), ("k", "string")]
    wh.apply(table, [env(table, ins(table, cols, [1, "x"])), env(table, dele(table, [("k", "string")], ["x"]))])
    wh.apply(table, [env(table, ins(table, cols, [2, "x"]))])
    assert sorted(backend.read_rows(table, cols)) == [(2, "x")]
    r = wh.apply(table, [env(table, dele(table, [("k", "string")], ["x"])), env(table, ins(table, cols, [3, "x"]))])
    assert (r.rows_deleted, r.rows_inserted) == (1, 1)
    assert sorted(backend.read_rows(table, cols)) == [(3, "x")]


def test_a_value_the_warehouse_cannot_store_is_terminal_and_commits_nothing(backend: Backend, table: str) -> None:
    """A v1 (JSON) datetime the API would have refused: not retryable, and nothing of the call
    applies, so the pipeline can retry each envelope alone to find the culprit."""
    from app.warehouse.base import TransientWarehouseError

    wh = backend.warehouse
    cols = [("id", "integer"), ("d", "datetime")]
    good = env(table, ins(table, cols, [1, "2024-01-02T03:04:05"]))
    bad = env(table, ins(table, cols, [2, "not a datetime"]))
    with pytest.raises(Exception) as raised:
        wh.apply(table, [good, bad])
    assert not isinstance(raised.value, TransientWarehouseError)
    assert wh.table_schema(table) is None or ids(backend, table) == []
    r = wh.apply(table, [good])  # the good envelope was not recorded as applied
    assert (r.applied_envelopes, r.skipped_duplicates) == (1, 0) and ids(backend, table) == [1]


def test_transient_and_terminal_errors_are_distinct() -> None:
    from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError

    assert not issubclass(TerminalWarehouseError, TransientWarehouseError)
    assert not issubclass(TransientWarehouseError, TerminalWarehouseError)
    assert TransientWarehouseError("throttled", retry_after=3.0).retry_after == 3.0
    assert TransientWarehouseError("unreachable").retry_after is None


# --------------------------------------------------------------------------- registry


def test_a_third_warehouse_is_one_package_plus_one_registry_line(tmp_path) -> None:
    """`tests.support.memory_warehouse.registration` is that line; WAREHOUSE=memory opens it."""
    import tests.support.memory_warehouse.registration  # noqa: F401  (registers "memory")
    from app.settings import Settings
    from app.warehouse.registry import open_warehouse
    from tests.support.memory_warehouse import MemoryWarehouse

    wh = open_warehouse(Settings(data_dir=tmp_path, warehouse="memory"))
    try:
        assert isinstance(wh, MemoryWarehouse)
        r = wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
        assert r.rows_inserted == 1 and wh.list_tables() == ["t"]
    finally:
        wh.close()


# --------------------------------------------------------------------------- many tables at once


def test_apply_many_gives_one_outcome_per_table_and_a_rejection_stops_no_other_table(backend: Backend, table: str) -> None:
    wh = backend.warehouse
    a, b, c = table + "_a", table + "_b", table + "_c"
    wh.apply(b, [env(b, ins(b, [("id", "integer")], [1]))])
    outcomes = wh.apply_many([
        (a, [env(a, ins(a, [("id", "integer")], [1])), env(a, ins(a, [("id", "integer")], [2]))]),
        (b, [env(b, ins(b, [("id", "string")], ["not a number"]))]),  # a type conflict: rejected
        (c, [env(c, ins(c, [("id", "integer")], [3]))]),
    ])
    assert [type(o).__name__ for o in outcomes] == ["ApplyResult"] * 3
    assert (outcomes[0].rows_inserted, len(outcomes[1].rejections), outcomes[2].rows_inserted) == (2, 1, 1)
    assert sorted(ids(backend, a)) == [1, 2] and ids(backend, b) == [1] and ids(backend, c) == [3]


def test_quarantine_rows_apply_to_the_quarantine_table(backend: Backend, table: str) -> None:
    from app.contracts.check import Violation
    from app.contracts.quarantine import QUARANTINE_COLUMNS, quarantine_row
    from app.schema.identifiers import QUARANTINE_TABLE

    quarantined = Activity("insert", table, ["id", "coupon"], ["integer", "string"], [7, "XMAS"])
    violation = Violation("columns", "discard_row", "coupon", 1, f"column 'coupon' is not declared for table {table!r}")
    row = quarantine_row(quarantined, 3, violation, f"batch-{table}", "2026-01-02T03:04:05.000006Z")
    result = backend.warehouse.apply(QUARANTINE_TABLE, [env(QUARANTINE_TABLE, row)])
    assert (result.rows_inserted, result.rejections) == (1, [])
    rows = [r for r in backend.read_rows(QUARANTINE_TABLE, list(QUARANTINE_COLUMNS)) if r[5] == f"batch-{table}"]
    assert rows == [(
        table, "columns", violation.reason, "coupon", 3, f"batch-{table}",
        dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), quarantined.to_dict(),
    )]
