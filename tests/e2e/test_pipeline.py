"""End to end on the embedded default: real processes, HTTP in, DuckDB file out."""

from __future__ import annotations

import json
import signal


from tests.support.processes import ROOT, wait_until

README_BODY = json.loads((ROOT / "examples" / "readme.json").read_text())


def _activity(op, table, names, types, values):
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def test_readme_example_lands_typed(pipeline):
    r = pipeline.post(README_BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["error"] is False and body["accepted"] == 2 and body["batch_id"]

    rows = wait_until(lambda: pipeline.query("SELECT user_id, event_type_id, detail, occured_at FROM user_activities_table ORDER BY user_id"), what="rows")
    assert rows == [
        (1, 2, "logged in", "2021-03-30T06:12:44"),
        (2, 5, "changed password", "2021-03-30T06:14:02"),
    ]
    types = dict(pipeline.query(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'user_activities_table'"
    ))
    assert types == {"user_id": "BIGINT", "event_type_id": "BIGINT", "detail": "VARCHAR", "occured_at": "TIMESTAMP"}

    # The CLI a data engineer uses prints the same rows while the subscriber runs.
    out = pipeline.cli("query", "SELECT user_id, detail FROM user_activities_table ORDER BY user_id", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"user_id": 1, "detail": "logged in"}, {"user_id": 2, "detail": "changed password"}]


def test_no_trailing_slash_and_error_shapes(pipeline):
    import httpx

    r = httpx.post(pipeline.api_url + "/api-log/v1", json=README_BODY, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 2

    bad = {"user_activities": [README_BODY["user_activities"][0], _activity("insert", "t", ["a"], ["integer"], ["x"])]}
    r = pipeline.post(bad)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] is True and any(d["loc"] == "user_activities[1].col_values[0]" for d in body["details"])

    r = httpx.post(pipeline.api_url + "/api-log/v1/", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] is True
    r = httpx.post(pipeline.api_url + "/api-log/v1/", content=b"a=b", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_invalid_batch_publishes_nothing(pipeline):
    bad = {"user_activities": [_activity("insert", "never_created", ["a"], ["integer"], [1]),
                               _activity("insert", "never_created", ["a"], ["integer"], [1.5])]}
    assert pipeline.post(bad).status_code == 422
    # A valid batch after it is applied, and the rejected one never shows up.
    assert pipeline.post({"user_activities": [_activity("insert", "marker", ["a"], ["integer"], [1])]}).status_code == 200
    wait_until(lambda: pipeline.query("SELECT count(*) FROM marker") == [(1,)], what="marker row")
    tables = {r[0] for r in pipeline.query("SELECT table_name FROM information_schema.tables")}
    assert "never_created" not in tables


def test_delete_schema_evolution_and_type_conflict(pipeline):
    t = "accounts"
    batch = [
        _activity("insert", t, ["id", "name"], ["integer", "string"], [1, "ann"]),
        _activity("insert", t, ["id", "name"], ["integer", "string"], [2, "bob"]),
        _activity("insert", t, ["id", "name", "score"], ["integer", "string", "numeric"], [3, None, "12.5"]),
        _activity("delete", t, ["id"], ["integer"], [1]),
        _activity("delete", t, ["name"], ["string"], [None]),  # null matches IS NULL: removes id 3
        _activity("insert", t, ["id", "name"], ["integer", "integer"], [4, 7]),  # type conflict
        _activity("delete", t, ["nope"], ["integer"], [1]),  # unknown column
        _activity("delete", "no_such_table", ["id"], ["integer"], [1]),  # counted no-op
        _activity("insert", t, ["id", "name"], ["integer", "string"], [5, "eve"]),
    ]
    r = pipeline.post({"user_activities": batch})
    assert r.status_code == 200, r.text
    rows = wait_until(
        lambda: (rs := pipeline.query(f"SELECT id, name, score FROM {t} ORDER BY id")) and rs[-1][0] == 5 and rs,
        what="last insert applied",
    )
    assert [tuple(x) for x in rows] == [(2, "bob", None), (5, "eve", None)]

    out = pipeline.cli("dead-letters", "list", "--json")
    assert out.returncode == 0, out.stderr
    letters = [json.loads(line) for line in out.stdout.splitlines()]
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(letters) == 2, letters
    assert any("name" in r and "integer" in r and "string" in r for r in reasons), reasons
    assert any("nope" in r for r in reasons), reasons
    conflict = next(letter for letter in letters if letter["payload"]["col_values"] == [4, 7])
    assert conflict["payload"]["col_types"] == ["integer", "integer"] and conflict["table"] == t


def test_idempotency_key_retry_creates_no_duplicates(pipeline):
    body = {"user_activities": [_activity("insert", "payments", ["id"], ["integer"], [42])]}
    first = pipeline.post(body, headers={"Idempotency-Key": "req-123"})
    second = pipeline.post(body, headers={"Idempotency-Key": "req-123"})
    assert first.status_code == second.status_code == 200
    assert first.json()["batch_id"] == second.json()["batch_id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    other = pipeline.post({"user_activities": [_activity("insert", "payments", ["id"], ["integer"], [43])]},
                          headers={"Idempotency-Key": "req-123"})
    assert other.status_code == 409
    assert pipeline.post({"user_activities": [_activity("insert", "payments", ["id"], ["integer"], [99])]}).status_code == 200
    wait_until(lambda: pipeline.query("SELECT max(id) FROM payments") == [(99,)], what="marker")
    assert pipeline.query("SELECT id, count(*) FROM payments GROUP BY id ORDER BY id") == [(42, 1), (99, 1)]


def test_health_and_readiness(pipeline):
    import httpx

    assert httpx.get(pipeline.api_url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(pipeline.api_url + "/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    r = httpx.get(pipeline.admin_url + "/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    docs = httpx.get(pipeline.api_url + "/openapi.json").json()
    example = json.dumps(docs["components"]["schemas"])
    assert "user_activities_table" in example and "/api-log/v1/" in docs["paths"]


def test_sigterm_finishes_and_query_reads_file_after(pipeline):
    body = {"user_activities": [_activity("insert", "events", ["n"], ["integer"], [i]) for i in range(500)]}
    for _ in range(4):
        assert pipeline.post(body).status_code == 200
    wait_until(lambda: pipeline.query("SELECT count(*) FROM events") == [(2000,)], what="2000 rows")
    assert pipeline.kill("subscriber", signal.SIGTERM) == 0
    # With the subscriber gone, the CLI opens the DuckDB file itself.
    out = pipeline.cli("query", "SELECT count(*) AS n FROM events", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 2000}]
