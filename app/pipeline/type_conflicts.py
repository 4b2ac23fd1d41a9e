"""Type conflicts the warehouse found, routed by the table's contract (docs/contracts.md#type-widening).

The edge checks declared columns against the file; a column it does not know (an
undeclared one under `columns = "evolve"`) can still meet a type its warehouse column
neither takes nor widens to. Under the table's `types = "discard_row"` such an activity
goes to `_ingest_quarantine`, as at the edge; under any other mode it is dead-lettered
as before (`freeze` refuses only what the edge can see: declared columns).

The quarantine rows apply like any activity, with a dedup id derived from the refused
activity's, so a redelivery lands them once.
"""

from __future__ import annotations

from typing import Sequence

from app.contracts.check import Violation
from app.contracts.file import TablesConfig
from app.contracts.quarantine import quarantine_row, received_at_now
from app.messages.envelope import Envelope
from app.schema.identifiers import QUARANTINE_TABLE
from app.warehouse.base import Rejection


def to_quarantine(
    config: TablesConfig | None, table: str, rejections: Sequence[Rejection], batch_ids: dict[str, str],
    key_ids: dict[str, str | None] | None = None,
) -> tuple[list[Envelope], list[Rejection]]:
    """The quarantine envelopes for the rejections the table's contract quarantines, and the others.

    `batch_ids` and `key_ids` map a message's dedup id to the request's batch id and the
    API key that sent it (as the edge's quarantine rows carry them)."""
    if config is None or config.settings_for(table).contract.types != "discard_row":
        return [], list(rejections)
    envelopes: list[Envelope] = []
    rest: list[Rejection] = []
    received_at = received_at_now()
    for r in rejections:
        conflict = r.type_conflict
        if conflict is None:
            rest.append(r)
            continue
        violation = Violation("types", "discard_row", conflict.column, None, str(conflict))
        key_id = (key_ids or {}).get(r.dedup_id)
        row = quarantine_row(r.activity, r.index, violation, batch_ids.get(r.dedup_id, r.dedup_id), received_at, key_id)
        envelopes.append(Envelope(f"{r.dedup_id}:quarantine:{r.index}", QUARANTINE_TABLE, [row]))
    return envelopes, rest
