"""Operability of the real processes: metrics scrapes, JSON logs with ids, readiness, /tables."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import Pipeline, wait_until


def _activity(op, table, names, types, values):
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def log_events(pipeline: Pipeline, which: str) -> list[dict]:
    lines = (pipeline.log_dir / f"{which}.log").read_text().splitlines()
    events = []
    for line in lines:
        event = json.loads(line)  # one JSON object per line, nothing else
        assert {"ts", "level", "logger", "msg"} <= set(event), line
        events.append(event)
    return events


def test_subscriber_metrics_after_inserts_deletes_and_a_rejection(pipeline):
    t = "metered"
    batch = [
        _activity("insert", t, ["id", "name"], ["integer", "string"], [1, "a"]),
        _activity("insert", t, ["id", "name"], ["integer", "string"], [2, "b"]),
        _activity("insert", t, ["id", "name", "extra"], ["integer", "string", "float"], [3, "c", 1.5]),
        _activity("delete", t, ["id"], ["integer"], [1]),
        _activity("insert", t, ["id", "name"], ["integer", "integer"], [4, 9]),  # type conflict -> dead letter
    ]
    r = pipeline.post({"user_activities": batch})
    assert r.status_code == 200, r.text
    wait_until(lambda: pipeline.stats()["dead_lettered"] == 1 and pipeline.stats()["messages_acked"] >= 1, what="applied")

    sub = scrape(pipeline.admin_url)
    assert value(sub, "pipeline_rows_applied_total", table=t, operation="insert") == 3
    assert value(sub, "pipeline_rows_applied_total", table=t, operation="delete") == 1
    assert value(sub, "pipeline_dead_lettered_total", reason="rejected") == 1
    assert value(sub, "pipeline_schema_changes_total") >= 1  # table created (with its columns)
    assert value(sub, "pipeline_messages_acked_total") == 1
    assert value(sub, "pipeline_apply_seconds_count") >= 1 and value(sub, "pipeline_apply_seconds_sum") > 0
    assert value(sub, "broker_backlog_messages") == 0  # refreshed on scrape

    api = scrape(pipeline.api_url)
    assert value(api, "ingest_requests_total", status="200") == 1
    assert value(api, "ingest_activities_accepted_total") == 5
    assert value(api, "ingest_publish_seconds_count") == 1
    # Each process lists only its own metrics.
    assert not [n for n, _ in api if n.startswith("pipeline_")] and not [n for n, _ in sub if n.startswith("ingest_")]

    # A later batch with a new column is one more schema change.
    changes = value(sub, "pipeline_schema_changes_total")
    r = pipeline.post({"user_activities": [_activity("insert", t, ["id", "late"], ["integer", "boolean"], [5, True])]})
    assert r.status_code == 200
    wait_until(lambda: value(scrape(pipeline.admin_url), "pipeline_schema_changes_total") == changes + 1, what="column added")

    # /tables: row counts per user table, last write, internal tables left out.
    tables = httpx.get(pipeline.admin_url + "/tables", timeout=10).json()
    assert tables["warehouse"] == "duckdb"
    by_name = {x["table"]: x for x in tables["tables"]}
    assert set(by_name) == {t}
    assert by_name[t]["rows"] == 3 and by_name[t]["last_write"] > 0


def test_logs_carry_request_and_batch_ids_and_no_values(pipeline):
    secret = "s3cret-value-do-not-log"
    body = {"user_activities": [_activity("insert", "logged", ["id", "note"], ["integer", "string"], [7, secret])]}
    r = pipeline.post(body, headers={"X-Request-ID": "req-ok-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-ok-1"
    batch_id = r.json()["batch_id"]
    bad = {"user_activities": [_activity("insert", "logged", ["id"], ["integer"], [secret])]}
    r_bad = pipeline.post(bad)  # no id sent: one is generated and echoed
    assert r_bad.status_code == 422
    generated = r_bad.headers["x-request-id"]
    wait_until(lambda: pipeline.query("SELECT count(*) FROM logged") == [(1,)], what="row applied")
    wait_until(lambda: any(e["msg"] == "applied" for e in log_events(pipeline, "subscriber")), what="apply log line")

    api_events = log_events(pipeline, "api")
    mine = [e for e in api_events if e.get("request_id") == "req-ok-1"]
    assert [e["msg"] for e in mine] == ["request finished"], mine
    assert all(e["batch_id"] == batch_id for e in mine)
    assert mine[0]["activities"] == 1 and mine[0]["messages"] == 1 and mine[0]["duplicate"] is False
    assert mine[0]["status"] == 200 and mine[0]["path"] == "/api-log/v1/"
    assert [e["status"] for e in api_events if e.get("request_id") == generated] == [422]
    # Every line that belongs to a batch belongs to a request.
    assert all("request_id" in e for e in api_events if "batch_id" in e)

    sub_events = log_events(pipeline, "subscriber")
    applied = [e for e in sub_events if e["msg"] == "applied"]
    assert any(e["batch_id"] == batch_id and e["table"] == "logged" and e["rows_inserted"] == 1 for e in applied), applied

    for which in ("api", "subscriber"):
        text = (pipeline.log_dir / f"{which}.log").read_text()
        assert secret not in text, which


def test_log_level_is_honoured(tmp_path):
    p = Pipeline.create(tmp_path, LOG_LEVEL="WARNING")
    try:
        p.start("api")
        assert p.post({"user_activities": [_activity("insert", "quiet", ["id"], ["integer"], [1])]}).status_code == 200
        p.stop()
        events = log_events(p, "api")
        assert not [e for e in events if e["level"] in ("info", "debug")], events
    finally:
        p.stop()
    p = Pipeline.create(tmp_path / "debug", LOG_LEVEL="DEBUG")
    try:
        p.start("api")
        httpx.get(p.api_url + "/metrics", headers={"X-Request-ID": "scrape-1"}, timeout=10)
        wait_until(lambda: any(e.get("request_id") == "scrape-1" and e["level"] == "debug" for e in log_events(p, "api")),
                   what="debug line of the scrape")
    finally:
        p.stop()


def test_subscriber_not_ready_while_warehouse_is_locked(tmp_path):
    """Another process holds the DuckDB file: alive, not ready (with the reason); ready once released."""
    p = Pipeline.create(tmp_path)
    p.data_dir.mkdir(parents=True)
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); time.sleep(300)",
         str(p.data_dir / "warehouse.duckdb")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        p.start("subscriber")  # /healthz answers: alive
        p.start("api")
        r = httpx.get(p.admin_url + "/readyz", timeout=10)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False and body["broker"] == "ok"
        assert "lock" in body["warehouse"].lower(), body
        assert httpx.get(p.api_url + "/readyz", timeout=10).status_code == 200  # the API only needs the broker
        # Batches are still accepted and wait in the broker meanwhile.
        assert p.post({"user_activities": [_activity("insert", "waiting", ["id"], ["integer"], [1])]}).status_code == 200
        tables = httpx.get(p.admin_url + "/tables", timeout=10)
        assert tables.status_code == 503 and "warehouse unavailable" in tables.json()["message"]

        locker.terminate()
        locker.wait(timeout=30)
        wait_until(lambda: httpx.get(p.admin_url + "/readyz", timeout=5).status_code == 200, timeout=60, what="ready")
        wait_until(lambda: p.query("SELECT count(*) FROM waiting") == [(1,)], timeout=90, what="waiting batch applied")
    finally:
        if locker.poll() is None:
            locker.kill()
            locker.wait()
        p.stop()
