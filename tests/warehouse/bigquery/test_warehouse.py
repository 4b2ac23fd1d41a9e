"""BigQueryWarehouse: readiness, exactly once across failures and restarts, names, queries (app/warehouse/bigquery/warehouse.py).

Over the wire against bqemulator unless a test says otherwise (fixtures in conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from app.schema.columnar import runs_of
from app.warehouse.base import Envelope, TransientWarehouseError
from app.warehouse.bigquery import DEDUP_COLUMN, BigQueryWarehouse


from tests.support.builders import dele, env, ins
from tests.warehouse.bigquery.support import crash_before_done, ids


def test_ready_reports_missing_dataset(wh) -> None:
    ok, reason = wh.ready()
    assert not ok and wh.dataset in reason


def test_ready_without_permission_to_probe_is_unknown_not_down(wh, monkeypatch) -> None:
    from google.api_core import exceptions as gexc

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise gexc.Forbidden("Access Denied: Dataset", errors=[{"reason": "accessDenied"}])

    monkeypatch.setattr(wh.client.rest, "get_dataset", denied)
    ok, reason = wh.ready()
    assert ok and reason.startswith("unknown")

    def throttled(*args: Any, **kwargs: Any) -> Any:
        raise gexc.Forbidden("Exceeded rate limits", errors=[{"reason": "rateLimitExceeded"}])

    monkeypatch.setattr(wh.client.rest, "get_dataset", throttled)
    assert wh.ready()[0] is False


def test_failure_after_rows_committed_is_retried_without_duplicates(wh, monkeypatch) -> None:
    t = "retry"
    cols = [("id", "integer")]
    wh.apply(t, [env(t, ins(t, cols, [0]))])
    e = env(t, ins(t, cols, [1]), ins(t, cols, [2]), dele(t, cols, [0]))
    real = wh._write_markers
    calls = {"done": 0}

    def flaky(markers: Any, per_table: list, state: str) -> Any:
        if state == "done":
            calls["done"] += 1
            if calls["done"] == 1:
                raise TransientWarehouseError("simulated: completion marker lost")
        return real(markers, per_table, state)

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
    e = env(t, ins(t, cols, [1, "a"]), ins(t, cols, [2, "b"]))
    crash_before_done(settings, t, env(t, ins(t, cols, [0, "z"])), e)
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


@pytest.mark.parametrize("columnar", [False, True], ids=["v1", "v2"])
def test_reserved_and_invalid_column_names_are_rejected(wh, columnar: bool) -> None:
    t = "names_v2" if columnar else "names"
    e = env(
        t,
        ins(t, [("id", "integer")], [1]),
        ins(t, [("id", "integer"), (DEDUP_COLUMN, "string")], [2, "x"]),
        ins(t, [("id", "integer"), ("bad-name", "string")], [3, "x"]),
    )
    sent = Envelope(e.dedup_id, t, runs=runs_of(e.activities)) if columnar else e
    r = wh.apply(t, [sent])
    assert [j.index for j in r.rejections] == [1, 2]
    assert "reserved" in r.rejections[0].reason and "not valid" in r.rejections[1].reason
    assert r.rejections[0].activity == e.activities[1]
    assert ids(wh, t) == [1]


def test_query_errors_and_positional_params(wh) -> None:
    from app.warehouse.base import WarehouseQueryError

    t = "q"
    wh.apply(
        t,
        [
            env(
                t,
                ins(t, [("id", "integer"), ("s", "string")], [1, "a"]),
                ins(t, [("id", "integer"), ("s", "string")], [2, "b"]),
            )
        ],
    )
    cols, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{t}` WHERE s = ? AND id > ?", ["b", 0])
    assert cols == ["id"] and rows == [(2,)]
    with pytest.raises(WarehouseQueryError):
        wh.query(f"SELECT nope FROM `{wh.dataset}.{t}`")


def test_query_values_render_as_on_duckdb(wh) -> None:
    """The same stored values, read back through BigQuery's client, render like DuckDB's (python -m app query)."""
    from app.pipeline.render import render_rows
    from tests.support.typed_values import TYPED_COLUMNS

    cols = [("id", "integer")] + [(name, typ) for name, typ, _, _ in TYPED_COLUMNS]
    acts = [ins("every_type", cols, [row] + [c[2][row] for c in TYPED_COLUMNS]) for row in range(3)]
    assert wh.apply("every_type", [env("every_type", *acts)]).rejections == []
    # bqemulator quirks only: BYTES and GEOGRAPHY do not round-trip through its query results.
    quirk = {"bytes": "TO_BASE64({0}) AS {0}", "geography": "ST_ASTEXT({0}) AS {0}"}
    select = ", ".join(quirk.get(typ, "{0}").format(name) for name, typ, _, _ in TYPED_COLUMNS)
    result = wh.query(f"SELECT {select} FROM `{wh.dataset}.every_type` ORDER BY id")
    columns, rows = result
    assert columns == [c[0] for c in TYPED_COLUMNS] and len(result.types) == len(columns)
    rendered = render_rows(rows, result.types)
    expected = [[c[3][row] for c in TYPED_COLUMNS] for row in range(3)]
    names = [c[0] for c in TYPED_COLUMNS]
    record, geography = names.index("r"), names.index("g")
    for got, want in zip(rendered, expected):
        import json

        # a record renders as its JSON text; compare it as JSON
        got[record] = None if got[record] is None else json.loads(got[record])
        # the emulator's ST_ASTEXT writes "POINT (1 2)" where BigQuery writes "POINT(1 2)"
        got[geography] = None if got[geography] is None else got[geography].replace(" (", "(")
        assert got == want
