"""The API's receipts writer: accepted batches queued off the request, written in turns,
and kept for another try when the store is out of reach."""

from __future__ import annotations

from app.broker import OutgoingMessage
from app.messages.codec import new_batch_id
from app.receipts.sqlite import SqliteReceiptStore
from app.receipts.writer import ReceiptWriter


class FlakyStore(SqliteReceiptStore):
    failures = 1

    def add_accepted(self, batches):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store out of reach")
        super().add_accepted(batches)


def test_a_batch_the_store_refused_is_written_at_the_next_turn(tmp_path):
    writer = ReceiptWriter(FlakyStore(tmp_path / "receipts.sqlite"), retention_seconds=3600)
    try:
        first, second = new_batch_id(None), new_batch_id(None)
        writer.accepted(first, "k", [OutgoingMessage(b"", "orders", {"table": "orders", "count": "2"})])
        writer.flush()  # refused: held
        assert writer.store.lookup(first) is None
        writer.accepted(second, "k", [OutgoingMessage(b"", "users", {"table": "users", "count": "1"})])
        assert [t.activities for t in writer.lookup(first).tables] == [2]
        assert [t.table for t in writer.lookup(second).tables] == ["users"]
    finally:
        writer.close()
