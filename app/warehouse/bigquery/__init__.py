"""BigQuery warehouse, split by role (as dlt splits a destination):

- `client.py`: the one wrapper around the REST and Storage Write clients (timeouts,
  bounded retries, call and bytes counters);
- `errors.py`: the one translation of errors into transient / terminal;
- `types.py`: the type mapper (reads `app.schema.types`);
- `schema.py`: table and schema state (the key an upsert fixed), the markers table;
- `writer.py`: Storage Write default stream over long-lived connections, insertAll;
- `queries.py`: marker lookups, clean-ups, parameterized deletes;
- `upsert.py`: a run of upserts as one MERGE from a bound `ARRAY<STRUCT>`;
- `receipts.py`: the delivery receipts store (`_ingest_receipts`), for the API and subscriber;
- `warehouse.py`: `BigQueryWarehouse`, orchestrating an apply.
"""

from app.warehouse.bigquery.client import BigQueryClient, ensure_dataset, make_bigquery_client, make_write_client
from app.warehouse.bigquery.errors import is_transient
from app.warehouse.bigquery.schema import DEDUP_COLUMN, MARKERS_TABLE
from app.warehouse.bigquery.warehouse import BigQueryWarehouse

__all__ = [
    "DEDUP_COLUMN",
    "MARKERS_TABLE",
    "BigQueryClient",
    "BigQueryWarehouse",
    "ensure_dataset",
    "is_transient",
    "make_bigquery_client",
    "make_write_client",
]
