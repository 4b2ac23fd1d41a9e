"""Hostile names and values through the real processes: refused or stored literally, never run.

Identifiers carrying SQL (quotes, backticks, semicolons, comments, look-alike letters,
over-long names) are refused with 422 naming the field. Values carrying SQL are stored
as text and read back byte-for-byte equal, and the warehouse afterwards still has every
table with its right row count.
"""

from __future__ import annotations

import json

import pytest

from tests.support.faults.local import HOSTILE_NAMES, HOSTILE_VALUES, scenario_injection
from tests.support.processes import wait_until

PATH = "/api-log/v1/"

def _act(op, table, names, types, values):
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


@pytest.fixture
def victim(pipeline):
    r = pipeline.post({"user_activities": [_act("insert", "victim", ["id"], ["integer"], [i]) for i in range(3)]})
    assert r.status_code == 200, r.text
    wait_until(lambda: pipeline.query("SELECT count(*) FROM victim") == [(3,)], what="victim rows")
    return pipeline


def test_hostile_identifiers_are_refused_naming_the_field(victim):
    p = victim
    for name in HOSTILE_NAMES:
        for op in ("insert", "delete"):
            r = p.post({"user_activities": [_act(op, name, ["id"], ["integer"], [1])]})
            assert r.status_code == 422, (name, r.text)
            assert [d["loc"] for d in r.json()["details"]] == ["user_activities[0].table"], (name, r.json())
            r = p.post({"user_activities": [_act(op, "victim", ["id", name], ["integer", "string"], [1, "x"])]})
            assert r.status_code == 422, (name, r.text)
            assert [d["loc"] for d in r.json()["details"]] == ["user_activities[0].col_names[1]"], (name, r.json())
    # A column *type* carrying SQL is refused too, naming its field.
    r = p.post({"user_activities": [_act("insert", "victim", ["id"], ["integer); DROP TABLE victim; --"], [1])]})
    assert r.status_code == 422 and r.json()["details"][0]["loc"] == "user_activities[0].col_types[0]", r.text
    # Nothing reached the warehouse: a marker batch after them is the only change.
    assert p.post({"user_activities": [_act("insert", "victim", ["id"], ["integer"], [99])]}).status_code == 200
    wait_until(lambda: p.query("SELECT count(*) FROM victim") == [(4,)], what="marker row")
    tables = {r[0] for r in p.query("SELECT table_name FROM information_schema.tables")}
    assert {t for t in tables if not t.startswith("_ingest_")} == {"victim"}, tables
    assert [r[0] for r in p.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'victim'")] == ["id"]


def test_hostile_values_are_stored_literally_and_never_executed(victim):
    p = victim
    rows = [_act("insert", "notes", ["id", "body", "raw", "meta"], ["integer", "string", "bytes", "record"],
                 [i, v, None, {v: v, "nested": {"k": [v]}}]) for i, v in enumerate(HOSTILE_VALUES)]
    rows.append(_act("insert", "notes", ["id", "body"], ["integer", "string"], [len(HOSTILE_VALUES), "plain"]))
    r = p.post({"user_activities": rows})
    assert r.status_code == 200, r.text
    n = len(HOSTILE_VALUES) + 1
    wait_until(lambda: p.query("SELECT count(*) FROM notes") == [(n,)], what="every hostile row")
    stored = {i: (body, meta) for i, body, meta in p.query("SELECT id, body, CAST(meta AS VARCHAR) FROM notes")}

    for i, v in enumerate(HOSTILE_VALUES):
        body, meta = stored[i]
        assert body == v, (i, body[:80])
        assert json.loads(meta) == {v: v, "nested": {"k": [v]}}

    # A delete matching on a hostile value removes exactly that row, nothing else.
    target = HOSTILE_VALUES[1]  # "'; DELETE FROM victim WHERE '1'='1"
    r = p.post({"user_activities": [_act("delete", "notes", ["body"], ["string"], [target]),
                                    _act("delete", "notes", ["body"], ["string"], ["x' OR '1'='1"])]})
    assert r.status_code == 200, r.text
    wait_until(lambda: p.query("SELECT count(*) FROM notes") == [(n - 1,)], what="one row deleted")
    assert p.query("SELECT count(*) FROM notes WHERE body = 'plain'") == [(1,)]
    # The victim table is untouched and nothing else was created.
    assert p.query("SELECT count(*) FROM victim") == [(3,)]
    tables = {r[0] for r in p.query("SELECT table_name FROM information_schema.tables")}
    assert {t for t in tables if not t.startswith("_ingest_")} == {"victim", "notes"}, tables
    assert p.cli("dead-letters", "list", "--json").stdout.strip() == ""  # nothing was refused downstream


def test_over_long_values_are_refused_with_413_naming_the_limit(pipeline):
    big = "x'; DROP TABLE victim; --" * (1024 * 1024 // 25 + 1)  # just over the 1 MiB value limit
    r = pipeline.post({"user_activities": [_act("insert", "victim", ["id", "s"], ["integer", "string"], [1, big])]})
    assert r.status_code == 413, r.status_code
    message = r.json()["message"]
    assert "user_activities[0].col_values[1]" in message and "1048576" in message, message


def test_injection_scenario_of_the_report(tmp_path):
    """The same classes of input as above, as `scripts/reliability.py` runs them."""
    o = scenario_injection(tmp_path)
    assert o.data["refused_naming_field"] == o.data["identifiers"]
    assert o.data["read_back_equal"] == o.data["values"]
    assert o.data["tables"] == ["hostile", "victim"] and o.data["victim_rows"] == 3
    assert o.lost == 0
