"""What every receipts store keeps and answers: accepted batches and message outcomes.

A batch's state per table follows from both: `accepted` until every message of that
table has an outcome, then `dead_lettered` if any of its activities were, else
`applied`; a table all of whose activities a contract quarantined is `quarantined` (they
travel to `_ingest_quarantine`, listed as a table of its own). Outcomes are keyed by
dedup id, so a redelivered message is counted once, whatever the store holds twice.

Batch ids of plain requests begin with their time (`batch_time`), so a store can find a
batch's rows by time and tell "past retention" (410) from "never seen" (404) without
keeping the id.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

BATCH_ID_PATTERN = re.compile(r"[0-9a-f]{32}\Z")  # what `app.messages.codec.new_batch_id` makes
TIMED_ID_VERSION = "7"  # the 13th digit of a batch id that begins with its time (as in UUIDv7)
ANY_SENDER = object()  # `gone`: the sender is unknown, so every key is told the batch is gone


@dataclass(frozen=True, slots=True)
class Accepted:
    """One table's share of an accepted batch."""

    table: str
    messages: int
    activities: int
    quarantined: int = 0  # activities a contract sent to `_ingest_quarantine` instead


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message: rows applied, rows dead-lettered (with the first reason)."""

    dedup_id: str
    batch_id: str
    table: str
    rows_applied: int
    rows_dead_lettered: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class TableReceipt:
    table: str
    state: str  # accepted | applied | dead_lettered | quarantined
    activities: int
    rows_applied: int
    rows_dead_lettered: int
    settled_at: float | None  # when its last message was applied or dead-lettered
    reason: str | None
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class Receipt:
    batch_id: str
    key_id: str | None
    accepted_at: float
    tables: list[TableReceipt]

    @property
    def state(self) -> str:
        """The batch's least settled state: accepted, then dead_lettered, then quarantined, then applied."""
        states = {t.state for t in self.tables}
        return next(s for s in ("accepted", "dead_lettered", "quarantined", "applied") if s in states)

    def as_json(self) -> dict[str, Any]:
        """The answer of `GET /api-log/v1/batches/{id}` and `python -m app batch ID`."""
        return {
            "batch_id": self.batch_id,
            "state": self.state,
            "key_id": self.key_id,
            "accepted_at": _time(self.accepted_at),
            "tables": [
                {"table": t.table, "state": t.state, "activities": t.activities, "rows_applied": t.rows_applied,
                 "rows_dead_lettered": t.rows_dead_lettered, "quarantined": t.quarantined,
                 "settled_at": _time(t.settled_at), "reason": t.reason}
                for t in self.tables
            ],
        }


@dataclass(frozen=True, slots=True)
class AcceptedRow:
    """A stored share of an accepted batch, as a store reads it back."""

    table: str
    key_id: str | None
    accepted_at: float
    messages: int
    activities: int
    quarantined: int


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    dedup_id: str
    table: str
    rows_applied: int
    rows_dead_lettered: int
    reason: str | None
    settled_at: float


def receipt_of(batch_id: str, accepted: Sequence[AcceptedRow], outcomes: Iterable[OutcomeRow]) -> Receipt | None:
    """The receipt from a batch's stored rows (in the order stored), each share and each
    message's outcome counted once however often it was written; None if never accepted."""
    shares: dict[str, AcceptedRow] = {}
    for row in accepted:
        shares.setdefault(row.table, row)
    if not shares:
        return None
    settled: dict[str, dict[str, OutcomeRow]] = {}
    for o in outcomes:
        settled.setdefault(o.table, {}).setdefault(o.dedup_id, o)
    tables = []
    for share in shares.values():
        done = list(settled.get(share.table, {}).values())
        dead = sum(o.rows_dead_lettered for o in done)
        if not share.messages:  # every activity of the table was quarantined
            state = "quarantined"
        else:
            state = "accepted" if len(done) < share.messages else ("dead_lettered" if dead else "applied")
        reasons = sorted(o.reason for o in done if o.reason)
        settled_at = max((o.settled_at for o in done), default=None)
        tables.append(TableReceipt(
            share.table, state, share.activities, sum(o.rows_applied for o in done), dead,
            settled_at if state not in ("accepted", "quarantined") else None, reasons[0] if reasons else None,
            share.quarantined,
        ))
    first = next(iter(shares.values()))
    return Receipt(batch_id, first.key_id, first.accepted_at, tables)


def batch_time(batch_id: str) -> float | None:
    """When a timed batch id was made (seconds since the epoch); None for other ids."""
    if len(batch_id) != 32 or batch_id[12] != TIMED_ID_VERSION:
        return None
    return int(batch_id[:12], 16) / 1000.0


def past_retention(batch_id: str, retention_seconds: float, now: float | None = None) -> bool:
    """Whether a timed batch id is older than the retention: its receipt is gone, if it had one."""
    made = batch_time(batch_id)
    return made is not None and made < (time.time() if now is None else now) - retention_seconds


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class ReceiptStore(ABC):
    """Where receipts live: `open_receipts` picks the store of the configured warehouse."""

    @abstractmethod
    def add_accepted(self, batches: Iterable[tuple[str, str | None, float, list[Accepted]]]) -> None:
        """(batch id, key id, accepted at, per-table shares) of accepted batches."""

    @abstractmethod
    def add_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        """Settled messages' outcomes; one written twice (a redelivery) counts once."""

    @abstractmethod
    def lookup(self, batch_id: str) -> Receipt | None: ...

    @abstractmethod
    def gone(self, batch_id: str) -> tuple[bool, object]:
        """Whether the batch's receipt is past retention, and who sent it (`ANY_SENDER` if unknown)."""

    def purge(self, retention_seconds: float, now: float | None = None) -> int:
        """Drops receipts past the retention; returns how many batches (0 where the store expires them itself)."""
        return 0

    def close(self) -> None:
        return None
