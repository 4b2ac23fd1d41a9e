"""Contract modes at the edge: every mode x entity, on small (per activity) and large (columnar) requests.

What is published is read back from the broker: nothing on a 422; kept activities plus
one `_ingest_quarantine` row per quarantined activity; trimmed activities without the
dropped columns.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.api.app import create_app
from app.broker import make_broker
from app.messages.codec import decode_message
from app.schema.identifiers import QUARANTINE_TABLE
from app.settings import Settings

PATH = "/api-log/v1/"
LARGE = 40  # more than SMALL_BATCH_ACTIVITIES: the columnar path

ORDERS = """
[tables.orders]
columns = {{id = "integer", email = "string"}}
contract = {{tables = "{mode}", columns = "{mode}", types = "{mode}"}}
"""


def _activity(table="orders", names=("id", "email"), types=("integer", "string"), values=(1, "a@x"), operation="insert"):
    return {"operation": operation, "table": table, "col_names": list(names), "col_types": list(types), "col_values": list(values)}


GOOD = _activity()
NEW_COLUMN = _activity(names=("id", "email", "coupon"), types=("integer", "string", "string"), values=(2, "b@x", "XMAS"))
NEW_TYPE = _activity(names=("id", "email"), types=("string", "string"), values=("3", "c@x"))
NEW_TABLE = _activity(table="clicks", names=("id",), types=("integer",), values=(4,))


@pytest.fixture
def run(tmp_path):
    path = tmp_path / "tables.toml"
    settings = Settings(data_dir=tmp_path, tables_file=path)

    def post(file_text: str, activities: list[dict]):
        path.write_text(file_text)
        with TestClient(create_app(settings)) as client:
            answer = client.post(PATH, json={"user_activities": activities})
        broker = make_broker(settings)
        try:
            pulled = broker.pull(1000, 0.2)
            published = [a for m in pulled for a in decode_message(m).activities]
        finally:
            broker.close()
        return answer, published

    return post


def _times(activities, large):
    return [a for a in activities for _ in range(LARGE if large else 1)]


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize(
    ("bad", "loc", "rule"),
    [(NEW_COLUMN, "col_names[2]", "columns"), (NEW_TYPE, "col_types[0]", "types")],
)
def test_freeze_refuses_the_batch_naming_cell_and_rule(run, large, bad, loc, rule):
    answer, published = run(ORDERS.format(mode="freeze"), _times([GOOD, bad], large))
    assert answer.status_code == 422
    assert published == []
    details = answer.json()["details"]
    first_bad = LARGE if large else 1
    assert details[0]["loc"] == f"user_activities[{first_bad}].{loc}"
    assert f"contract {rule} = freeze" in details[0]["message"] and "tables.toml:4" in details[0]["message"]


@pytest.mark.parametrize("large", [False, True])
def test_freeze_refuses_an_undeclared_table_under_new_tables_refuse(run, large):
    text = '[defaults]\ncontract = "freeze"\nnew_tables = "refuse"\n' + ORDERS.format(mode="freeze")
    answer, published = run(text, _times([GOOD, NEW_TABLE], large))
    assert answer.status_code == 422 and published == []
    detail = answer.json()["details"][0]
    assert detail["loc"] == f"user_activities[{LARGE if large else 1}].table"
    assert "table 'clicks' is not declared" in detail["message"] and "new_tables = refuse" in detail["message"]


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize(("bad", "rule", "column"), [(NEW_COLUMN, "columns", "coupon"), (NEW_TYPE, "types", "id"), (NEW_TABLE, "tables", None)])
def test_discard_row_quarantines_the_violating_activities_and_applies_the_rest(run, large, bad, rule, column):
    text = '[defaults]\ncontract = "discard_row"\nnew_tables = "refuse"\n' + ORDERS.format(mode="discard_row")
    before = metrics.ACTIVITIES_QUARANTINED.labels("orders" if rule != "tables" else "_undeclared", rule)._value.get()
    answer, published = run(text, _times([bad, GOOD], large))
    assert answer.status_code == 200
    body = answer.json()
    n = LARGE if large else 1
    assert body["accepted"] == n and body["quarantined"] == n
    assert [q["index"] for q in body["quarantine"]] == list(range(n))
    assert {(q["rule"], q["column"]) for q in body["quarantine"]} == {(rule, column)}
    kept = [a for a in published if a.table == "orders"]
    rows = [a for a in published if a.table == QUARANTINE_TABLE]
    assert len(kept) == n and all(a.col_values == [1, "a@x"] for a in kept)
    assert len(rows) == n
    row = dict(zip(rows[0].col_names, rows[0].col_values))
    assert row["table_name"] == bad["table"] and row["rule"] == rule and row["column_name"] == column
    assert row["batch_id"] == body["batch_id"] and row["activity_index"] == 0
    assert row["activity"]["col_names"] == bad["col_names"]
    after = metrics.ACTIVITIES_QUARANTINED.labels("orders" if rule != "tables" else "_undeclared", rule)._value.get()
    assert after - before == n


@pytest.mark.parametrize("large", [False, True])
def test_discard_value_drops_undeclared_columns_and_lists_them(run, large):
    answer, published = run(ORDERS.format(mode="discard_value"), _times([NEW_COLUMN, GOOD], large))
    assert answer.status_code == 200
    n = LARGE if large else 1
    assert answer.json()["dropped_columns"] == [{"table": "orders", "column": "coupon", "activities": n}]
    assert answer.json()["accepted"] == 2 * n and "quarantined" not in answer.json()
    assert [a.col_names for a in published] == [["id", "email"]] * (2 * n)
    assert published[0].col_values == [2, "b@x"]


def test_discard_value_drops_a_value_of_another_type_and_quarantines_a_delete(run):
    delete = _activity(operation="delete", names=("id", "coupon"), types=("integer", "string"), values=(1, "XMAS"))
    answer, published = run(ORDERS.format(mode="discard_value"), [NEW_TYPE, delete])
    body = answer.json()
    assert body["dropped_columns"] == [{"table": "orders", "column": "id", "activities": 1}]
    assert body["quarantined"] == 1 and body["quarantine"][0]["index"] == 1
    assert "condition columns are never dropped" in body["quarantine"][0]["reason"]
    assert [(a.table, a.col_names) for a in published][0] == ("orders", ["email"])


@pytest.mark.parametrize("large", [False, True])
def test_evolve_accepts_new_columns_and_tables(run, large):
    answer, published = run(ORDERS.format(mode="evolve"), _times([GOOD, NEW_COLUMN, NEW_TABLE], large))
    assert answer.status_code == 200 and len(published) == 3 * (LARGE if large else 1)


@pytest.mark.parametrize("large", [False, True])
def test_evolve_keeps_declared_types(run, large):
    answer, published = run(ORDERS.format(mode="evolve"), _times([NEW_TYPE], large))
    assert answer.status_code == 422 and published == []
    assert "contract types = freeze" in answer.json()["details"][0]["message"]


def test_an_undeclared_table_evolves_when_new_tables_are_allowed(run):
    answer, published = run('[defaults]\ncontract = "freeze"\n', [NEW_TABLE])
    assert answer.status_code == 200 and [a.table for a in published] == ["clicks"]


def test_a_hot_reload_that_changes_a_mode_takes_effect_on_the_next_request(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text(ORDERS.format(mode="evolve"))
    with TestClient(create_app(Settings(data_dir=tmp_path, tables_file=path, tables_file_check_seconds=0))) as client:
        assert client.post(PATH, json={"user_activities": [NEW_COLUMN]}).status_code == 200
        path.write_text(ORDERS.format(mode="freeze"))
        assert client.post(PATH, json={"user_activities": [NEW_COLUMN]}).status_code == 422
        path.write_text(ORDERS.format(mode="discard_value") + "\n")
        assert client.post(PATH, json={"user_activities": [NEW_COLUMN]}).json()["dropped_columns"][0]["column"] == "coupon"
