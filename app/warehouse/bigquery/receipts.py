"""Delivery receipts on BigQuery: the `_ingest_receipts` table of the dataset.

Both processes write it, on separate hosts: the API an `accepted` row per (batch, table),
the subscriber an `outcome` row per settled message, before its ack. Rows are appended
to the table's default stream (at least once: "data ... appear[s] as soon as the write is
acknowledged", WriteStream.Type COMMITTED, so a lookup right after its POST sees it), and
a row written twice counts once (`receipt_of` keeps one share per table and one outcome
per dedup id). So a redelivered message, or a retried write, never counts twice, and no
marker or DML job is needed for exactness.

The table is partitioned by day on `at` (when the row was written) with a partition
expiration of the retention plus one day: "The storage in a partition will have an
expiration time of its partition time plus this value"
(https://cloud.google.com/bigquery/docs/reference/rest/v2/tables#TimePartitioning), and
the partition time is the day's start, so every row is kept at least the retention.
It is clustered by `batch_id`. A lookup filters on both: a timed batch id (its first
digits are its time) reads only the partitions since it was made, and clustering reads
only the blocks that may hold the id. Google bills a query at least 10 MB
(https://cloud.google.com/bigquery/pricing#on_demand_pricing), which is what a lookup
costs until a day of receipts outgrows it (docs/google-cloud.md). Nothing is purged by
hand: expired partitions are dropped by BigQuery, and a timed id past the retention is
answered "gone" without a query.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Iterable

import pyarrow as pa
from google.cloud import bigquery

from app.receipts.base import (
    ANY_SENDER, Accepted, AcceptedRow, Outcome, OutcomeRow, Receipt, ReceiptStore, batch_time, past_retention,
    receipt_of,
)
from app.schema.identifiers import INTERNAL_PREFIX
from app.settings import Settings
from app.warehouse.bigquery.client import BigQueryClient
from app.warehouse.bigquery.schema import TableRef
from app.warehouse.bigquery.writer import InsertAllWriter, StorageWriter, insert_id, split_rows

RECEIPTS_TABLE = INTERNAL_PREFIX + "receipts"
ACCEPTED, OUTCOME = "accepted", "outcome"
WRITE_TIMEOUT_SECONDS = 10.0  # a receipt is a report: the apply does not wait long for it
CLOCK_SKEW_SECONDS = 300.0  # a timed id is looked for from this long before its time (hosts' clocks differ)
DAY_MS = 86_400_000

_FIELDS = [
    bigquery.SchemaField("batch_id", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("kind", "STRING", mode="REQUIRED"),  # accepted | outcome
    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("at", "TIMESTAMP", mode="REQUIRED"),  # accepted at, or settled at
    bigquery.SchemaField("key_id", "STRING"),
    bigquery.SchemaField("messages", "INTEGER"),
    bigquery.SchemaField("activities", "INTEGER"),
    bigquery.SchemaField("quarantined", "INTEGER"),
    bigquery.SchemaField("dedup_id", "STRING"),
    bigquery.SchemaField("rows_applied", "INTEGER"),
    bigquery.SchemaField("rows_dead_lettered", "INTEGER"),
    bigquery.SchemaField("reason", "STRING"),
]
_ARROW_SCHEMA = pa.schema([
    ("batch_id", pa.string()), ("kind", pa.string()), ("table_name", pa.string()), ("at", pa.timestamp("us", tz="UTC")),
    ("key_id", pa.string()), ("messages", pa.int64()), ("activities", pa.int64()), ("quarantined", pa.int64()),
    ("dedup_id", pa.string()), ("rows_applied", pa.int64()), ("rows_dead_lettered", pa.int64()), ("reason", pa.string()),
])
_LOOKUP = (
    "SELECT kind, table_name, key_id, UNIX_MICROS(at) AS at_us, messages, activities, quarantined, dedup_id,"
    " rows_applied, rows_dead_lettered, reason FROM {table}"
    " WHERE at >= @since AND batch_id = @batch_id ORDER BY at"
)


class BigQueryReceiptStore(ReceiptStore):
    def __init__(self, settings: Settings, client: BigQueryClient | None = None) -> None:
        self.retention_seconds = settings.receipt_retention_days * 86400
        self.client = client or BigQueryClient(settings)
        self.ref = TableRef(settings.gcp_project, settings.bigquery_dataset, RECEIPTS_TABLE)
        self.insert_mode = settings.bigquery_insert_mode
        self.writer = StorageWriter(self.client, connections=1, timeout=WRITE_TIMEOUT_SECONDS)
        self.insert_all = InsertAllWriter(self.client)
        self._ready = False
        self._ready_lock = threading.Lock()

    # ----------------------------------------------------------------- writes

    def add_accepted(self, batches: Iterable[tuple[str, str | None, float, list[Accepted]]]) -> None:
        self._append([
            {"batch_id": b, "kind": ACCEPTED, "table_name": a.table, "at": at, "key_id": key_id,
             "messages": a.messages, "activities": a.activities, "quarantined": a.quarantined}
            for b, key_id, at, shares in batches for a in shares
        ])  # fmt: skip

    def add_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        now = time.time()
        self._append([
            {"batch_id": o.batch_id, "kind": OUTCOME, "table_name": o.table, "at": now, "dedup_id": o.dedup_id,
             "rows_applied": o.rows_applied, "rows_dead_lettered": o.rows_dead_lettered, "reason": o.reason}
            for o in outcomes
        ])  # fmt: skip

    def _append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self._ensure_table()
        if self.insert_mode == "insert_all":
            json_rows = [{**r, "at": _utc(r["at"]).isoformat()} for r in rows]
            row_ids = [insert_id(f"{r['batch_id']}\x00{r['table_name']}\x00{r.get('dedup_id') or ''}", 0) for r in rows]
            chunks = self.insert_all.chunks(json_rows, row_ids, [300 + len(r.get("reason") or "") for r in rows])
            self.insert_all.insert(self.ref.api, RECEIPTS_TABLE, chunks)
            return
        columns = {name: [r.get(name) for r in rows] for name in _ARROW_SCHEMA.names}
        columns["at"] = [_utc(t) for t in columns["at"]]
        batch = pa.RecordBatch.from_pydict(columns, schema=_ARROW_SCHEMA)
        requests, _ = split_rows(batch)  # a receipt row is far below the request limit
        self.writer.append(self.ref.default_stream, RECEIPTS_TABLE, requests)

    # ----------------------------------------------------------------- reads

    def lookup(self, batch_id: str) -> Receipt | None:
        if past_retention(batch_id, self.retention_seconds):
            return None  # `gone` answers it, without a query
        self._ensure_table()
        made = batch_time(batch_id)
        since = (made - CLOCK_SKEW_SECONDS) if made is not None else time.time() - self.retention_seconds - 86400
        params = [
            bigquery.ScalarQueryParameter("since", "TIMESTAMP", _utc(since)),
            bigquery.ScalarQueryParameter("batch_id", "STRING", batch_id),
        ]
        rows = self.client.query(_LOOKUP.format(table=self.ref.sql), params, "query", f"receipt of batch {batch_id}")
        accepted: list[AcceptedRow] = []
        outcomes: list[OutcomeRow] = []
        for r in rows:
            at = r["at_us"] / 1e6
            if r["kind"] == ACCEPTED:
                accepted.append(AcceptedRow(r["table_name"], r["key_id"], at, r["messages"] or 0, r["activities"] or 0,
                                            r["quarantined"] or 0))  # fmt: skip
            else:
                outcomes.append(OutcomeRow(r["dedup_id"], r["table_name"], r["rows_applied"] or 0,
                                           r["rows_dead_lettered"] or 0, r["reason"], at))  # fmt: skip
        return receipt_of(batch_id, accepted, outcomes)

    def gone(self, batch_id: str) -> tuple[bool, object]:
        # Expired partitions keep no tombstone; a timed id tells its own age (to any key alike).
        return (True, ANY_SENDER) if past_retention(batch_id, self.retention_seconds) else (False, None)

    def close(self) -> None:
        self.writer.close()
        self.client.close()

    # ----------------------------------------------------------------- the table

    def _ensure_table(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                self.ensure_table()

    def ensure_table(self) -> str:
        """Create the table, or set its expiration to the retention's; what was done
        (`created`, `updated`, `exists`: `pubsub.sh` reports it)."""
        expiration_ms = int(self.retention_seconds * 1000) + DAY_MS
        existing = self.client.get_table(self.ref.api)
        if existing is not None:
            done = "exists"
            partitioning = existing.time_partitioning
            if partitioning is not None and partitioning.expiration_ms != expiration_ms:  # the retention changed
                partitioning.expiration_ms = expiration_ms
                existing.time_partitioning = partitioning
                self.client.update_table(existing, ["time_partitioning"])
                done = "updated (partition expiration)"
            self._ready = True
            return done
        table = bigquery.Table(self.ref.api, schema=_FIELDS)
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field="at", expiration_ms=expiration_ms
        )
        table.clustering_fields = ["batch_id"]
        table.description = "ingest pipeline: delivery receipts (accepted batches, settled messages)"
        self.client.create_own_table(table)
        self._ready = True
        return "created"


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
