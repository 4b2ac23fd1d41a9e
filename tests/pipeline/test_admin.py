"""The subscriber's admin port over a real local broker and DuckDB file: its own metrics only."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.messages.codec import encode_batch
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.base import Envelope
from tests.support.subscribers import admin_url, local_pipeline, publish_one, running, wait_until


def _scrape(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples if not s.labels}


def test_admin_metrics_list_only_the_subscribers_metrics(tmp_path):
    with local_pipeline(Settings(data_dir=tmp_path)) as (broker, _, _, subscriber), admin_url(subscriber) as url:
        before = _scrape(url)
        publish_one(broker, "t", "batch1")
        assert _scrape(url)["broker_backlog_messages"] == 1
        with running(subscriber):
            wait_until(lambda: subscriber.totals.messages_acked == 1, "the message to be applied and acked")
        after = _scrape(url)
    assert after["pipeline_messages_acked_total"] - before.get("pipeline_messages_acked_total", 0) == 1
    assert after["pipeline_apply_seconds_count"] >= 1 and after["broker_backlog_messages"] == 0
    assert "process_resident_memory_bytes" in after
    assert not [n for n in after if n.startswith("ingest_")], "the API's metrics belong on the API"


def test_tables_and_query_answer_in_activity_terms(tmp_path):
    # /tables lists every user table (not only those this process wrote) with exact
    # counts; /query types its columns with activity types, as the renderer needs them.
    with local_pipeline(Settings(data_dir=tmp_path)) as (broker, warehouse, _, subscriber), admin_url(subscriber) as url:
        warehouse.apply("old", [Envelope("e1", "old", [Activity("insert", "old", ["n"], ["integer"], [1])] * 3)])
        messages = encode_batch(
            [Activity("insert", "new", ["wall", "g", "r"], ["datetime", "geography", "record"],
                      ["2024-01-02T03:04:05", "POINT(1 2)", {"a": 1}])], "batch1"
        )
        asyncio.run(broker.publish(messages, batch_id="batch1"))
        with running(subscriber):
            wait_until(lambda: subscriber.totals.messages_acked == 1, "the message to be applied and acked")
            tables = httpx.get(url + "/tables", timeout=10).json()
            answer = httpx.post(url + "/query", json={"sql": 'SELECT wall, g, r, count(*) OVER () :: HUGEINT AS c FROM "new"'},
                                timeout=10).json()
    assert tables["warehouse"] == "duckdb"
    assert [(t["table"], t["rows"]) for t in tables["tables"]] == [("new", 1), ("old", 3)]
    assert tables["tables"][0]["last_write"] is not None and tables["tables"][1]["last_write"] is None
    assert answer["types"] == ["datetime", "geography", "record", None]
    assert answer["rows"] == [["2024-01-02T03:04:05", "POINT(1 2)", '{"a":1}', "1"]]


def test_readyz_and_metrics_say_why_while_the_warehouse_refuses_the_subscriber(tmp_path):
    from tests.support.memory_warehouse import MemoryWarehouse
    from app.warehouse.base import WarehouseUnavailable

    refusing = [True]

    def plan(table, envelopes):
        if refusing[0]:
            raise WarehouseUnavailable("403 accessDenied: role revoked", reason="permission_denied")

    settings = Settings(data_dir=tmp_path, retry_backoff_max_seconds=0.2, max_in_place_retry_seconds=0)
    with local_pipeline(settings, MemoryWarehouse(before_apply=plan)) as (broker, _, store, subscriber), \
            admin_url(subscriber) as url:

        def blocked_gauge() -> float:
            r = httpx.get(url + "/metrics", timeout=10)
            samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples if s.name == "subscriber_blocked"]
            return sum(s.value for s in samples if s.labels.get("reason") == "permission_denied")

        publish_one(broker, "t", "batch1")
        with running(subscriber):
            wait_until(lambda: subscriber.blocked is not None, "the subscriber blocked")
            r = httpx.get(url + "/readyz", timeout=10)
            assert r.status_code == 503
            assert r.json()["warehouse"].startswith("blocked: permission_denied") and "accessDenied" in r.json()["warehouse"]
            assert blocked_gauge() == 1
            refusing[0] = False
            wait_until(lambda: subscriber.totals.messages_acked == 1, "applied once the warehouse accepts again")
            assert httpx.get(url + "/readyz", timeout=10).status_code == 200
            assert blocked_gauge() == 0
        assert store.count() == 0
