"""`python -m app quarantine list|replay`: the `_ingest_quarantine` rows, and replaying them.

A row is replayed only once its activity passes the API's validator and the current
tables file keeps it as it is (no refusal, quarantine or trim). It is published with
a delete of its quarantine row, as one batch whose id derives from the row, so a
re-run re-publishes the same dedup ids and each lands once. A row that would fail again
stays and is reported with why, as `dead-letters replay` does. PII policies are not
applied again: the row holds the values as the edge already transformed them.

Rows are read through the running subscriber's admin port, else from the warehouse.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from app.broker import make_broker
from app.contracts.check import KEEP, verdict
from app.contracts.pii import delete_problem
from app.contracts.quarantine import QUARANTINE_COLUMNS
from app.contracts.reload import tables_file_of
from app.messages.codec import encode_batch, new_batch_id
from app.schema.activity import Activity
from app.schema.identifiers import QUARANTINE_TABLE, check_table_name
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from app.schema.values import normalize_timestamp
from app.settings import Settings

log = logging.getLogger("app.quarantine")

QUERY_WAIT_SECONDS = 30.0
_SELECT = f"SELECT {', '.join(name for name, _ in QUARANTINE_COLUMNS)} FROM {QUARANTINE_TABLE}"
# The columns a replay's delete names: together they identify one quarantined activity.
_ROW_KEY = (("batch_id", "string"), ("activity_index", "integer"), ("table_name", "string"))


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    table_name: str
    rule: str
    reason: str
    column_name: str | None
    activity_index: int
    batch_id: str
    received_at: str  # canonical timestamp
    activity: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    entry: QuarantineEntry
    batch_id: str | None = None
    problem: str | None = None


def _entry(row: list[Any]) -> QuarantineEntry:
    table, rule, reason, column, index, batch_id, received_at, activity = row
    if isinstance(activity, (str, bytes)):
        activity = orjson.loads(activity)
    return QuarantineEntry(table, rule, reason, column, int(index), batch_id, normalize_timestamp(str(received_at)), activity)


def _rows(settings: Settings, table: str | None) -> list[list[Any]]:
    from app.admin_client import admin_request, through_subscriber
    from app.pipeline.render import render_rows
    from app.warehouse import open_read_only

    sql, params = (_SELECT, []) if table is None else (f"{_SELECT} WHERE table_name = ?", [table])

    def directly() -> list[list[Any]]:
        warehouse = open_read_only(settings)
        try:
            if warehouse.table_schema(QUARANTINE_TABLE) is None:
                return []
            result = warehouse.query(sql, params)
        finally:
            warehouse.close()
        return render_rows(result[1], result.types)

    def via_admin() -> list[list[Any]]:
        if admin_request(settings, f"/tables/{QUARANTINE_TABLE}")["columns"] is None:
            return []
        return admin_request(settings, "/query", {"sql": sql, "params": params})["rows"]

    return through_subscriber(via_admin, directly, QUERY_WAIT_SECONDS)


def list_entries(settings: Settings, table: str | None = None, since: str | None = None) -> list[QuarantineEntry]:
    """The quarantined activities, oldest first; `since` is any accepted timestamp form."""
    if table is not None and (problem := check_table_name(table)) is not None:
        raise ValueError(problem)
    after = normalize_timestamp(since) if since is not None else None
    entries = [_entry(row) for row in _rows(settings, table)]
    return sorted((e for e in entries if after is None or e.received_at >= after), key=lambda e: (e.received_at, e.batch_id, e.activity_index))


def _problem(settings: Settings, entry: QuarantineEntry, config: Any) -> tuple[Activity | None, str | None]:
    try:
        [activity] = validate_batch({"user_activities": [entry.activity]}, max_activities=1)
    except (BatchInvalid, LimitExceeded) as exc:
        details = getattr(exc, "details", None) or [{"message": str(exc)}]
        return None, "; ".join(d["message"] for d in details)
    if config is not None:
        # The row holds the activity after its PII policies: a delete may have lost a condition.
        if (problem := delete_problem(config, activity.table, activity.operation, list(config.settings_for(activity.table).pii))):
            return None, problem
        found = verdict(config, activity.table, activity.operation, activity.col_names, activity.col_types)
        if found.action != KEEP:
            return None, "the contract still does not allow it: " + "; ".join(v.describe(found.where) for v in found.violations)
    return activity, None


def replay(settings: Settings, table: str | None = None, since: str | None = None) -> list[ReplayOutcome]:
    entries = list_entries(settings, table, since)
    config = tables_file_of(settings).current()
    outcomes: list[ReplayOutcome] = []
    broker = None
    try:
        for entry in entries:
            activity, problem = _problem(settings, entry, config)
            if activity is None:
                log.warning("quarantined activity %s[%d] not replayed: %s", entry.batch_id, entry.activity_index, problem)
                outcomes.append(ReplayOutcome(entry, problem=problem))
                continue
            if broker is None:
                broker = make_broker(settings)
            batch_id = new_batch_id(f"quarantine-replay:{entry.batch_id}:{entry.activity_index}")
            release = Activity("delete", QUARANTINE_TABLE, [n for n, _ in _ROW_KEY], [t for _, t in _ROW_KEY],
                               [entry.batch_id, entry.activity_index, entry.table_name])
            messages = encode_batch([activity, release], batch_id, broker.capabilities.message)
            asyncio.run(broker.publish(messages, batch_id=batch_id))
            log.info("replayed quarantined activity %s[%d] as batch %s", entry.batch_id, entry.activity_index, batch_id)
            outcomes.append(ReplayOutcome(entry, batch_id=batch_id))
    finally:
        if broker is not None:
            broker.close()
    return outcomes
