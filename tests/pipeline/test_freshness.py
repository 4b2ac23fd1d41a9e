"""Freshness: last applied time per table, the publish-to-apply lag, and /readyz naming tables behind."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.messages.deadletters import DeadLetterStore
from app.pipeline.freshness import Freshness
from app.pipeline.subscriber import Subscriber
from app.settings import Settings
from tests.support.memory_broker import MemoryBroker
from tests.support.memory_warehouse import MemoryWarehouse
from tests.support.subscribers import admin_url, local_pipeline, publish_one, running, wait_until


def _samples(url: str) -> list:
    r = httpx.get(url + "/metrics", timeout=10)
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_an_apply_sets_the_tables_last_applied_time_and_observes_its_lag_from_the_brokers_publish_time(tmp_path):
    with local_pipeline(Settings(data_dir=tmp_path)) as (broker, _, _, subscriber), admin_url(subscriber) as url:
        before = _samples(url)
        publish_one(broker, "fresh_t", "batch1")
        [pulled] = broker.pull(10, 0)
        published = pulled.published_at
        broker.nack([pulled], 0.0)
        assert published is not None  # the local broker says when it committed the message
        with running(subscriber):
            wait_until(lambda: subscriber.totals.messages_acked == 1, "the message to be applied and acked")
        after = _samples(url)
    assert _value(after, "warehouse_table_last_applied_timestamp_seconds", table="fresh_t") >= published
    lag_count = "pipeline_end_to_end_lag_seconds_count"
    assert _value(after, lag_count) - _value(before, lag_count) == 1
    assert _value(after, "pipeline_end_to_end_lag_seconds_sum") - _value(before, "pipeline_end_to_end_lag_seconds_sum") >= 0


def test_readyz_names_the_tables_whose_oldest_held_message_waits_longer_than_lag_warn_seconds(tmp_path):
    settings = Settings(data_dir=tmp_path, lag_warn_seconds=60)
    broker = MemoryBroker()
    subscriber = Subscriber(settings, broker, MemoryWarehouse(), DeadLetterStore(settings.dead_letter_file))
    now = 1_800_000_000.0
    subscriber.freshness.clock = lambda: now
    # what the scheduler holds (its own report is the next test's)
    subscriber.scheduler.oldest_published = lambda: {"late_t": now - 90, "prompt_t": now - 30}  # type: ignore[method-assign]
    with admin_url(subscriber) as url:
        r = httpx.get(url + "/readyz", timeout=10)
    assert r.status_code == 200, r.text  # behind is said, not failed
    assert r.json()["tables_behind"] == {"late_t": 90.0}


def test_the_scheduler_reports_each_held_tables_oldest_publish_time():
    broker = MemoryBroker()
    settings = Settings()
    subscriber = Subscriber(settings, broker, MemoryWarehouse(), None)  # type: ignore[arg-type]
    publish_one(broker, "a", "batch1")
    publish_one(broker, "a", "batch2")
    publish_one(broker, "b", "batch3")
    messages = broker.pull(10, 0)
    subscriber._dispatch(messages, subscriber.scheduler.begin_pull())
    first_of = {}
    for m in messages:
        first_of.setdefault(m.attributes["table"], m.published_at)
    assert subscriber.scheduler.oldest_published() == first_of


def test_behind_lists_only_tables_over_the_limit_and_a_broker_without_publish_times_is_not_guessed_at():
    freshness = Freshness(lag_warn_seconds=10, clock=lambda: 1000.0)
    assert freshness.behind({"a": 985.0, "b": 995.0, "c": 990.0}) == {"a": 15.0}
    lags_before = metrics.SUBSCRIBER.get_sample_value("pipeline_end_to_end_lag_seconds_count")
    freshness.applied("never_published_t", [None, None])
    assert metrics.SUBSCRIBER.get_sample_value("pipeline_end_to_end_lag_seconds_count") == lags_before
    assert metrics.SUBSCRIBER.get_sample_value(
        "warehouse_table_last_applied_timestamp_seconds", {"table": "never_published_t"}) == 1000.0
