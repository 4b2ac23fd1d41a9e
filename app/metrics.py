"""Prometheus metrics, declared in one place so names stay consistent.

Each process serves only its own: the API's `/metrics` lists `API`'s registry, the
subscriber's admin port `/metrics` lists `SUBSCRIBER`'s. A new metric names the
registry of the process that updates it (`registry=API` or `registry=SUBSCRIBER`);
tests/api/test_metrics.py checks that every metric here belongs to one of them.
"""

from __future__ import annotations

import logging
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

log = logging.getLogger("app.metrics")

API = CollectorRegistry()
SUBSCRIBER = CollectorRegistry()
for _registry in (API, SUBSCRIBER):  # process CPU, memory, GC: as the default registry has them
    for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        _registry.register(_collector)

# --------------------------------------------------------------------------- API process
ACTIVITIES_REJECTED = Counter("ingest_activities_rejected_total", "Activities refused at the edge (4xx).", registry=API)
# Tables under contract (docs/contracts.md); `table` is "_undeclared" for tables not in the file.
ACTIVITIES_QUARANTINED = Counter(
    "activities_quarantined", "Activities a contract sent to _ingest_quarantine, by table and rule.",
    ["table", "reason"], registry=API,
)
COLUMNS_DROPPED = Counter(
    "columns_dropped", "Values dropped from activities under discard_value, by table.", ["table"], registry=API
)



PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KeyTally:
    """One key's 200 answers and activities accepted: two slots a request adds to, no dict."""

    __slots__ = ("ok", "accepted")

    def __init__(self) -> None:
        self.ok = 0
        self.accepted = 0


class IngestTallies:
    """The counts every ingest request updates, as plain numbers, turned into metric
    families only when scraped.

    Updated by the event loop's thread alone (the middleware and the ingest handler), so
    they need no lock: a prometheus_client counter or histogram takes one and a few calls
    per update, which each request paid for (scripts/bench/findings.md).
    Per API key, `key` takes only the ids of configured keys (app.api.keys): bounded.
    """

    def __init__(self) -> None:
        self.requests: dict[int, int] = {}  # HTTP status -> ingest requests
        self.activities_accepted = 0
        self.publish_buckets = [0] * (len(PUBLISH_BUCKETS) + 1)  # the last one: above every bound
        self.publish_sum = 0.0
        self.key_requests: dict[tuple[str, int], int] = {}  # (key id, HTTP status) -> requests
        self.key_tallies: dict[str, KeyTally] = {}  # key id -> its 200 answers and activities accepted

    def tally_of(self, key_id: str) -> KeyTally:
        """The tally of a key id, kept across reloads of the keys file (a key object carries it)."""
        tally = self.key_tallies.get(key_id)
        if tally is None:
            tally = self.key_tallies[key_id] = KeyTally()
        return tally

    def count_key_request(self, key_id: str, status: int) -> None:
        pair, requests = (key_id, status), self.key_requests
        requests[pair] = requests.get(pair, 0) + 1

    def observe_publish(self, seconds: float) -> None:
        self.publish_buckets[bisect_left(PUBLISH_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        self.publish_sum += seconds

    def collect(self):
        requests = CounterMetricFamily("ingest_requests", "Ingest requests by HTTP status.", labels=["status"])
        for status, count in list(self.requests.items()):
            requests.add_metric([str(status)], count)
        accepted = CounterMetricFamily(
            "ingest_activities_accepted", "Activities accepted (durably published).", value=self.activities_accepted,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*PUBLISH_BUCKETS, float("inf")), list(self.publish_buckets)):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        publish = HistogramMetricFamily(
            "ingest_publish_seconds", "Time from validated request to durable publish.",
            buckets=buckets, sum_value=self.publish_sum,
        )
        key_requests = CounterMetricFamily(
            "ingest_key_requests", "Ingest requests that presented a valid key, by key id and HTTP status.",
            labels=["key", "status"],
        )
        for (key, status), count in list(self.key_requests.items()):
            key_requests.add_metric([key, str(status)], count)
        key_accepted = CounterMetricFamily(
            "ingest_key_activities_accepted", "Activities accepted (durably published), by key id.", labels=["key"],
        )
        for key, tally in list(self.key_tallies.items()):
            if tally.ok:  # keys that answered a 200: as before, no series for a key never used
                key_requests.add_metric([key, "200"], tally.ok)
                key_accepted.add_metric([key], tally.accepted)
        return [requests, accepted, publish, key_requests, key_accepted]


INGEST = IngestTallies()
API.register(INGEST)

# --------------------------------------------------------------------------- subscriber process
ROWS_APPLIED = Counter(
    "pipeline_rows_applied_total", "Rows written or deleted, per table and operation.", ["table", "operation"],
    registry=SUBSCRIBER,
)
MESSAGES_ACKED = Counter(
    "pipeline_messages_acked_total", "Messages acknowledged after the warehouse committed them.", registry=SUBSCRIBER
)
DUPLICATES_SKIPPED = Counter(
    "pipeline_duplicates_skipped_total", "Redelivered messages already applied (skipped).", registry=SUBSCRIBER
)
NOOP_DELETES = Counter("pipeline_noop_deletes_total", "Deletes on tables that do not exist.", registry=SUBSCRIBER)
APPLY_SECONDS = Histogram(
    "pipeline_apply_seconds",
    "Time to apply one table's messages of a pull to the warehouse.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=SUBSCRIBER,
)
TABLES_PER_APPLY = Histogram(
    "pipeline_tables_per_apply",
    "Tables applied together in one warehouse round trip.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
    registry=SUBSCRIBER,
)
MESSAGES_PER_APPLY = Histogram(
    "pipeline_messages_per_apply",
    "Messages applied in one warehouse round trip (all its tables).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
    registry=SUBSCRIBER,
)
MESSAGES_NACKED = Counter(
    "pipeline_messages_nacked_total", "Messages handed back to the broker for a later attempt, by why.", ["reason"],
    registry=SUBSCRIBER,
)
DEAD_LETTERED = Counter(
    "pipeline_dead_lettered_total", "Activities or messages sent to the dead-letter store.", ["reason"],
    registry=SUBSCRIBER,
)
SCHEMA_CHANGES = Counter("pipeline_schema_changes_total", "Tables created and columns added.", registry=SUBSCRIBER)
# Type conflicts the warehouse found that a table's contract quarantines (app.pipeline.type_conflicts)
ACTIVITIES_QUARANTINED_BY_SUBSCRIBER = Counter(
    "activities_quarantined", "Activities a contract sent to _ingest_quarantine, by table and rule.",
    ["table", "reason"], registry=SUBSCRIBER,
)
COLUMNS_WIDENED = Counter(
    "columns_widened", "Columns whose type widened in place (docs/contracts.md#type-widening), by table.", ["table"],
    registry=SUBSCRIBER,
)
SUBSCRIBER_BLOCKED = Gauge(
    "subscriber_blocked",
    "1 while the warehouse refuses this subscriber as a whole (permission, credentials, feature not enabled), by reason.",
    ["reason"],
    registry=SUBSCRIBER,
)
# Freshness (docs/operations.md#freshness): when each table last applied, and how long
# messages took from the broker's publish time to their apply.
TABLE_LAST_APPLIED = Gauge(
    "warehouse_table_last_applied_timestamp_seconds", "Unix time of the table's last successful apply.", ["table"],
    registry=SUBSCRIBER,
)
END_TO_END_LAG_SECONDS = Histogram(
    "pipeline_end_to_end_lag_seconds", "From the broker's publish time of a message to its apply (the warehouse's commit).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=SUBSCRIBER,
)
TRANSIENT_ERRORS = Counter("pipeline_transient_errors_total", "Warehouse errors retried with backoff.", registry=SUBSCRIBER)


# --------------------------------------------------------------------------- both: the broker backlog
class _BacklogGauges:
    """The broker backlog as one process sees it, refreshed on each scrape of its registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Gauge("broker_backlog_messages", "Messages waiting in the broker (local broker only).", registry=registry)
        self.oldest_seconds = Gauge(
            "broker_backlog_oldest_age_seconds", "Age of the oldest unacked message.", registry=registry
        )


_BACKLOG = {id(API): _BacklogGauges(API), id(SUBSCRIBER): _BacklogGauges(SUBSCRIBER)}


def render(registry: CollectorRegistry, broker) -> tuple[bytes, str]:
    """The Prometheus page of one process's `registry`, with its backlog gauges refreshed from `broker`.

    A scrape must still answer while the broker is down, so a failing backlog read
    leaves the gauges as they were.
    """
    try:
        stats = broker.backlog()
    except Exception as exc:
        log.warning("broker backlog unavailable for /metrics: %s", exc)
        stats = None
    if stats is not None:
        gauges = _BACKLOG[id(registry)]
        gauges.messages.set(stats.messages)
        gauges.oldest_seconds.set(stats.oldest_age_seconds or 0)
    return generate_latest(registry), CONTENT_TYPE_LATEST
