"""Prometheus metrics of both processes, declared in one place so names stay consistent.

The API exposes them on `/metrics`; the subscriber on its admin port's `/metrics`.
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("app.metrics")

REQUESTS = Counter("ingest_requests_total", "Ingest requests by HTTP status.", ["status"])
ACTIVITIES_ACCEPTED = Counter("ingest_activities_accepted_total", "Activities accepted (durably published).")
ACTIVITIES_REJECTED = Counter("ingest_activities_rejected_total", "Activities refused at the edge (4xx).")
PUBLISH_SECONDS = Histogram(
    "ingest_publish_seconds",
    "Time from validated request to durable publish.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKLOG_MESSAGES = Gauge("broker_backlog_messages", "Messages waiting in the broker (local broker only).")
BACKLOG_OLDEST_SECONDS = Gauge("broker_backlog_oldest_age_seconds", "Age of the oldest unacked message.")

ROWS_APPLIED = Counter("pipeline_rows_applied_total", "Rows written or deleted, per table and operation.", ["table", "operation"])
MESSAGES_ACKED = Counter("pipeline_messages_acked_total", "Messages acknowledged after the warehouse committed them.")
DUPLICATES_SKIPPED = Counter("pipeline_duplicates_skipped_total", "Redelivered messages already applied (skipped).")
NOOP_DELETES = Counter("pipeline_noop_deletes_total", "Deletes on tables that do not exist.")
APPLY_SECONDS = Histogram(
    "pipeline_apply_seconds",
    "Time to apply one table's messages of a pull to the warehouse.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MESSAGES_PER_APPLY = Histogram(
    "pipeline_messages_per_apply",
    "Messages of one table applied in one warehouse round trip.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
MESSAGES_NACKED = Counter(
    "pipeline_messages_nacked_total", "Messages handed back to the broker for a later attempt, by why.", ["reason"]
)
DEAD_LETTERED = Counter("pipeline_dead_lettered_total", "Activities or messages sent to the dead-letter store.", ["reason"])
SCHEMA_CHANGES = Counter("pipeline_schema_changes_total", "Tables created and columns added.")
TRANSIENT_ERRORS = Counter("pipeline_transient_errors_total", "Warehouse errors retried with backoff.")


def render(broker) -> tuple[bytes, str]:
    """The Prometheus page, with the backlog gauges refreshed from `broker` first.

    A scrape must still answer while the broker is down, so a failing backlog read
    leaves the gauges as they were.
    """
    try:
        stats = broker.backlog()
    except Exception as exc:
        log.warning("broker backlog unavailable for /metrics: %s", exc)
        stats = None
    if stats is not None:
        BACKLOG_MESSAGES.set(stats.messages)
        BACKLOG_OLDEST_SECONDS.set(stats.oldest_age_seconds or 0)
    return generate_latest(), CONTENT_TYPE_LATEST
