"""The status page's pieces without a browser: ring buffer, escaping, soft failures."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.api.app import create_app
from app.api.status import EventRate, Snapshot, build_commit, nice_ceiling, render
from app.messages.deadletters import DeadLetterStore, NewDeadLetter
from app.settings import Settings
from tests.support.processes import ROOT, free_port

README_BODY = json.loads((ROOT / "examples" / "readme.json").read_text())


def test_event_rate_ring_buffer():
    rate = EventRate(seconds=10)
    rate.record(3, now=100.2)
    rate.record(2, now=100.9)
    rate.record(5, now=103.0)
    assert rate.series(window=5, now=104.5) == [5, 0, 0, 5, 0]  # seconds 100..104
    rate.record(7, now=110.0)  # same slot as second 100: the old count is dropped, not added to
    assert rate.series(window=10, now=110.0) == [0, 0, 5, 0, 0, 0, 0, 0, 0, 7]  # seconds 101..110
    assert rate.series(window=50, now=200.0) == [0] * 10  # window capped at the buffer; all stale


def test_nice_ceiling():
    assert [nice_ceiling(v) for v in (0, 4, 7, 15, 22, 49, 237, 1000)] == [5, 5, 10, 20, 25, 50, 250, 1000]


def test_build_commit_from_env_or_git(monkeypatch, tmp_path):
    monkeypatch.setenv("BUILD_COMMIT", "deadbeef")
    assert build_commit() == "deadbeef"
    monkeypatch.delenv("BUILD_COMMIT")
    assert build_commit(tmp_path) is None  # not a repository: no commit, no error


def _snapshot(**kw) -> Snapshot:
    base = dict(
        rate=[0] * 300, backlog=(0, None), backlog_error=None, tables=[], tables_error=None, subscriber_stats=None,
        dead_letter_total=0, dead_letter_reasons={}, dead_letters=[], dead_letters_error=None, generated_at=1_700_000_000.0,
    )
    base.update(kw)
    return Snapshot(**base)


def test_user_derived_strings_are_escaped(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.sqlite")
    evil = "invalid column name '<script>alert(1)</script>'"
    store.add([NewDeadLetter(reason=evil, kind="activity", payload=b"{}", attempts=1, table_name="t<b>")])
    page = render(
        _snapshot(
            tables=[{"table": "x<img src=1>", "rows": 3, "last_write": None}],
            dead_letter_total=1, dead_letter_reasons=store.counts_by_reason(), dead_letters=store.list(),
        ),
        "0.1.0", "c<1>",
    )
    store.close()
    assert "<script>" not in page and "<img" not in page and "<b>" not in page and "c<1>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "x&lt;img src=1&gt;" in page


def test_status_route_fails_softly_and_counts_accepted(tmp_path):
    settings = Settings(data_dir=tmp_path, subscriber_port=free_port())  # nothing listens there
    with TestClient(create_app(settings)) as c:
        assert c.post("/api-log/v1/", json=README_BODY).status_code == 200
        r = c.get("/status")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["cache-control"] == "no-store"
        page = r.text
        assert "subscriber unreachable" in page and "No dead letters." in page
        assert '<meta http-equiv="refresh"' in page
        assert sum(c.app.state.event_rate.series()) == 2  # the README batch's two activities


def test_tables_show_their_contract_mode_and_quarantine_count_when_a_tables_file_is_set(tmp_path):
    from types import SimpleNamespace

    from app.api.status import _with_contracts
    from app.contracts.reload import TablesFile

    path = tmp_path / "tables.toml"
    path.write_text('[tables.orders]\ncontract = {columns = "freeze"}\n[tables."audit_*"]\ncontract = "discard_row"\n')
    state = SimpleNamespace(tables_file=TablesFile(path), settings=Settings(data_dir=tmp_path, subscriber_port=free_port()))
    tables = [{"table": "orders", "rows": 1, "last_write": None}, {"table": "audit_x", "rows": 2, "last_write": None}]
    _with_contracts(state, tables)  # no subscriber answers: counts unknown, shown as 0
    assert [(t["contract"], t["quarantined"]) for t in tables] == [
        ("tables=evolve, columns=freeze, types=evolve", 0), ("discard_row", 0),
    ]
    tables[1]["quarantined"] = 7
    page = render(_snapshot(tables=tables), "0.1.0", None)
    assert '<th>Contract</th><th class="num">Quarantined</th>' in page
    assert '<td class="contract">discard_row</td><td class="num quarantined">7</td>' in page
    plain = render(_snapshot(tables=[{"table": "orders", "rows": 1, "last_write": None}]), "0.1.0", None)
    assert "Contract" not in plain
