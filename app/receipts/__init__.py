"""Delivery receipts: what happened to each accepted batch, per table.

- `base`: the store interface, the receipt a lookup answers, and how its states follow;
- `sqlite`: the local store (a SQLite file next to the broker);
- `writer`: the API's side, recording accepted batches off the request path.
The store of a deployment is its warehouse's (`open_receipts`): BigQuery keeps its own
in the dataset (`app.warehouse.bigquery.receipts`).
"""

from app.receipts.base import BATCH_ID_PATTERN, ANY_SENDER, Receipt, ReceiptStore, TableReceipt
from app.receipts.writer import ReceiptWriter
from app.warehouse.registry import open_receipts

__all__ = ["ANY_SENDER", "BATCH_ID_PATTERN", "Receipt", "ReceiptStore", "ReceiptWriter", "TableReceipt", "open_receipts"]
