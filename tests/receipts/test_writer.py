"""The API's receipts writer: accepted batches queued off the request, written in turns,
and kept for another try when the store is out of reach."""

from __future__ import annotations

import time

from app.broker import OutgoingMessage
from app.messages.codec import new_batch_id
from app.receipts.sqlite import SqliteReceiptStore
from app.receipts.writer import RETRY_FIRST_SECONDS, WRITE_EVERY_SECONDS, ReceiptWriter


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


def test_a_store_out_of_reach_is_not_asked_again_every_turn(tmp_path):
    class DownStore(SqliteReceiptStore):
        calls = 0

        def add_accepted(self, batches):
            type(self).calls += 1
            raise ConnectionError("store out of reach")

    writer = ReceiptWriter(DownStore(tmp_path / "receipts.sqlite"), retention_seconds=3600)
    try:
        writer.accepted(new_batch_id(None), None, [OutgoingMessage(b"", "t", {"table": "t", "count": "1"})])
        deadline = time.monotonic() + 30
        while DownStore.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 10 * WRITE_EVERY_SECONDS < RETRY_FIRST_SECONDS
        time.sleep(10 * WRITE_EVERY_SECONDS)  # ten turns of the writer, all within the first back-off
        assert DownStore.calls == 1
    finally:
        writer._stop.set()
        writer._thread.join()
