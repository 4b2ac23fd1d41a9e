"""SQL the warehouse runs: marker lookups, clean-ups of unfinished attempts, deletes.

Every value is a bound query parameter; identifiers are validated before they get here.
Reads run through `BigQueryClient.query` (`query_and_wait`); DML through
`BigQueryClient.dml`, each job with an id derived from the table, the apply's dedup ids,
the statement and the attempt (`dml_job_id`), all under the table's `table_job_prefix`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Sequence
from dataclasses import dataclass, field

from google.cloud import bigquery

from app.warehouse import plan as planner
from app.warehouse.bigquery.client import BigQueryClient
from app.warehouse.bigquery.schema import DEDUP_COLUMN, MARKER_RETENTION_DAYS, TableRef, quote_column
from app.warehouse.bigquery.types import TypeMapper

MAX_DELETES_PER_STATEMENT = 1000
MAX_PARAMS_PER_STATEMENT = 8000  # well below the 10,000 parameters a query may have
INTENT = "intent"
DONE = "done"
JOB_PREFIX = "ingest_dml_"  # job ids: letters, digits, _ and -, at most 1,024 characters


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def table_job_prefix(ref: TableRef) -> str:
    """The start of the id of every DML job this pipeline runs on `ref`."""
    return f"{JOB_PREFIX}{_digest(ref.api, 16)}_"


def dml_job_id(ref: TableRef, ids: Sequence[str], statement: str, attempt: str) -> str:
    """The job id of one DML statement of one apply attempt of `ids`."""
    return f"{table_job_prefix(ref)}{_digest(chr(0).join(sorted(ids)), 24)}_{statement}_{attempt}"


@dataclass(slots=True)
class MarkerLookup:
    done: set[str] = field(default_factory=set)
    # dedup_id -> time of its earliest intent, for ids with an intent but no completion
    unfinished: dict[str, dt.datetime] = field(default_factory=dict)
    intents: set[str] = field(default_factory=set)  # every id that has an intent row


class Queries:
    def __init__(self, client: BigQueryClient, types: TypeMapper) -> None:
        self.client = client
        self.types = types

    # ----------------------------------------------------------------- markers

    def lookup_markers(self, markers: TableRef, table: str, ids: list[str]) -> MarkerLookup:
        """Intents and completions of `ids`, read from the retained partitions only.

        The markers table is clustered on (table_name, dedup_id) and partitioned by day
        on `marked_at`, so this reads a few blocks of the last days, not the whole table.
        """
        sql = (
            f"SELECT dedup_id, state, marked_at FROM {markers.sql} "
            "WHERE table_name = @table AND dedup_id IN UNNEST(@ids) "
            "AND marked_at >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @hours HOUR)"
        )
        params = [
            bigquery.ScalarQueryParameter("table", "STRING", table),
            bigquery.ArrayQueryParameter("ids", "STRING", ids),
            bigquery.ScalarQueryParameter("hours", "INT64", MARKER_RETENTION_DAYS * 24),
        ]
        found = MarkerLookup()
        for dedup_id, state, at in self.client.query(sql, params, "query", f"dedup lookup for {table}"):
            if state == DONE:
                found.done.add(dedup_id)
            else:
                found.intents.add(dedup_id)
                earliest = found.unfinished.get(dedup_id)
                found.unfinished[dedup_id] = at if earliest is None else min(earliest, at)
        for dedup_id in found.done:
            found.unfinished.pop(dedup_id, None)
        return found

    # ----------------------------------------------------------------- clean-up

    def clean(self, ref: TableRef, ids: list[str], since: dt.datetime | None, *, partitioned: bool, attempt: str) -> int:
        """Delete rows an unfinished earlier attempt of `ids` wrote; rows deleted.

        Those rows were written after the attempt's intent (`since`), so only partitions
        from that day on are read, plus rows not yet in a partition (NULL
        `_PARTITIONTIME` while in the write buffer).
        """
        sql = f"DELETE FROM {ref.sql} WHERE {DEDUP_COLUMN} IN UNNEST(@ids)"
        params: list = [bigquery.ArrayQueryParameter("ids", "STRING", ids)]
        if partitioned and since is not None:
            sql += " AND (_PARTITIONTIME IS NULL OR _PARTITIONTIME >= TIMESTAMP_TRUNC(@since, DAY))"
            params.append(bigquery.ScalarQueryParameter("since", "TIMESTAMP", since))
        return self.dml(sql, params, dml_job_id(ref, ids, "clean", attempt), f"clean-up in {ref.table}")

    # ----------------------------------------------------------------- deletes

    def delete_statements(self, ref: TableRef, step: planner.DeleteRows) -> list[tuple[str, list]]:
        """One DELETE per up to MAX_DELETES_PER_STATEMENT deletes (deletes commute)."""
        statements: list[tuple[str, list]] = []
        clauses: list[str] = []
        params: list = []
        for conditions in step.conditions:
            parts = [
                self.types.condition(quote_column(col), typ, value, f"p{len(params)}", params)
                for col, typ, value in conditions
            ]
            clauses.append("(" + " AND ".join(parts) + ")")
            if len(clauses) >= MAX_DELETES_PER_STATEMENT or len(params) >= MAX_PARAMS_PER_STATEMENT:
                statements.append((f"DELETE FROM {ref.sql} WHERE " + " OR ".join(clauses), params))
                clauses, params = [], []
        if clauses:
            statements.append((f"DELETE FROM {ref.sql} WHERE " + " OR ".join(clauses), params))
        return statements

    def dml(self, sql: str, params: list, job_id: str, what: str) -> int:
        return self.client.dml(sql, params, job_id, what)
