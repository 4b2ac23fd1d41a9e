"""The subscriber's side of receipts: each settled message's outcome, recorded before its ack.

A failure to record is logged and does not stop the apply: the receipt is a report
about the data, and holding the data back for it would be the wrong way round.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from app.broker import ReceivedMessage
from app.pipeline.scheduling import Held
from app.receipts.base import Outcome, ReceiptStore
from app.warehouse.base import Rejection

log = logging.getLogger("app.pipeline")


def _batch_id(message: ReceivedMessage) -> str:
    return message.attributes.get("batch_id") or message.dedup_id.rsplit(":", 2)[0]


class ReceiptRecorder:
    def __init__(self, store: ReceiptStore | None) -> None:
        self.store = store

    @staticmethod
    def applied_outcomes(table: str, batch: Sequence[Held], rejections: Sequence[Rejection]) -> list[Outcome]:
        """Messages the warehouse committed: rows applied, and those rejected into dead
        letters. The caller records the outcomes of all the tables of one apply together:
        one receipt transaction (one fsync) per apply, not per table."""
        rejected = Counter(r.dedup_id for r in rejections)
        reasons: dict[str, str] = {}
        for r in rejections:
            reasons.setdefault(r.dedup_id, r.reason)
        return [
            Outcome(h.envelope.dedup_id, _batch_id(h.message), table, len(h.envelope) - rejected[h.envelope.dedup_id],
                    rejected[h.envelope.dedup_id], reasons.get(h.envelope.dedup_id))
            for h in batch
        ]

    def dead_lettered(self, messages: Sequence[tuple[ReceivedMessage, str]], table: str | None = None) -> None:
        """Whole messages dead-lettered (undecodable, or failed too often)."""
        self.record([
            Outcome(m.dedup_id, _batch_id(m), table or m.attributes.get("table", ""), 0,
                    int(m.attributes.get("count", 0) or 1), reason)
            for m, reason in messages
        ])

    def record(self, outcomes: list[Outcome]) -> None:
        if self.store is None:
            return
        try:
            self.store.add_outcomes(outcomes)
        except Exception as exc:
            log.warning("could not record %d receipt outcome(s): %s", len(outcomes), exc)
