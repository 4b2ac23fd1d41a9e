"""Test builders: activities and envelopes from (column, type) pairs, one place for every test."""

from __future__ import annotations

import uuid
from typing import Any, Sequence

from app.schema.activity import Activity
from app.messages.envelope import Envelope

Columns = Sequence[tuple[str, str]]  # (column name, activity type)


def ins(table: str, cols: Columns, values: Sequence[Any]) -> Activity:
    return Activity("insert", table, [c for c, _ in cols], [t for _, t in cols], list(values))


def dele(table: str, cols: Columns, values: Sequence[Any]) -> Activity:
    return Activity("delete", table, [c for c, _ in cols], [t for _, t in cols], list(values))


def env(table: str, *activities: Activity, dedup_id: str | None = None, attempt: int = 1) -> Envelope:
    """An envelope of `table`; a fresh dedup_id unless one is given."""
    return Envelope(dedup_id or f"{uuid.uuid4().hex}:{table}:0", table, list(activities), attempt)


def ups(table: str, cols: Columns, values: Sequence[Any], key: Sequence[str]) -> Activity:
    return Activity("upsert", table, [c for c, _ in cols], [t for _, t in cols], list(values), list(key))
