"""Delivery receipts: what happened to each accepted batch, per table.

- `store`: the SQLite file (next to the broker) and the receipt a lookup answers.
- `writer`: the API's side, recording accepted batches off the request path.
"""

from app.receipts.store import BATCH_ID_PATTERN, Receipt, ReceiptStore, TableReceipt
from app.receipts.writer import ReceiptWriter

__all__ = ["BATCH_ID_PATTERN", "Receipt", "ReceiptStore", "ReceiptWriter", "TableReceipt"]
