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
# A filter on the partitioning column that keeps every partition, and rows still in the
# write buffer (NULL `_PARTITIONTIME`): a table with `require_partition_filter` refuses a
# query without a filter on it that can be used for partition elimination
# (https://cloud.google.com/bigquery/docs/querying-partitioned-tables#query_an_ingestion-time_partitioned_table).
EVERY_PARTITION = "(_PARTITIONTIME IS NULL OR _PARTITIONTIME >= TIMESTAMP '1970-01-01')"
# How far before its claim a fence looks for another attempt's `done` (see OwnerFence)
FENCE_LOOKBACK = dt.timedelta(hours=1)


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def table_job_prefix(ref: TableRef) -> str:
    """The start of the id of every DML job this pipeline runs on `ref`."""
    return f"{JOB_PREFIX}{_digest(ref.api, 16)}_"


def dml_job_id(ref: TableRef, ids: Sequence[str], statement: str, attempt: str) -> str:
    """The job id of one DML statement of one apply attempt of `ids`."""
    return f"{table_job_prefix(ref)}{_digest(chr(0).join(sorted(ids)), 24)}_{statement}_{attempt}"


@dataclass(frozen=True, slots=True)
class OwnerFence:
    """A condition that keeps a DML statement from changing anything once its attempt no
    longer owns its ids, evaluated by BigQuery when the job runs, not when it was sent.

    A DML job can wait in the table's queue and run long after its sender stopped
    waiting (https://cloud.google.com/bigquery/docs/data-manipulation-language#dml_statement_conflicts);
    a replica whose lease ran out can also send one late. Either way it runs against a
    snapshot taken at its start, in which a newer attempt's intent (written before that
    attempt changes anything; default-stream rows are readable at once,
    https://cloud.google.com/bigquery/docs/write-api#default_stream) or another attempt's
    `done` is visible: then the statement matches nothing, and the stale attempt's next
    owner check stops it. Same rule as `Queries.not_owned`.
    """

    markers: TableRef
    table: str
    ids: tuple[str, ...]
    attempt: str
    claimed_at: dt.datetime  # this attempt's intents' `marked_at`

    def sql(self) -> str:
        # the marked_at bound prunes the markers table to the claim's day (it is partitioned
        # by day on marked_at, clustered by table_name, dedup_id); an older `done` was seen
        # by the lookup just before the claim
        return (
            f"NOT EXISTS (SELECT 1 FROM {self.markers.sql} AS fence WHERE fence.table_name = @fence_table "
            "AND fence.dedup_id IN UNNEST(@fence_ids) AND fence.marked_at >= @fence_since "
            "AND IFNULL(fence.attempt, '') != @fence_attempt "
            "AND (fence.state = @fence_done OR fence.marked_at >= @fence_claimed))"
        )

    def params(self) -> list:
        return [
            bigquery.ScalarQueryParameter("fence_table", "STRING", self.table),
            bigquery.ArrayQueryParameter("fence_ids", "STRING", list(self.ids)),
            bigquery.ScalarQueryParameter("fence_since", "TIMESTAMP", self.claimed_at - FENCE_LOOKBACK),
            bigquery.ScalarQueryParameter("fence_attempt", "STRING", self.attempt),
            bigquery.ScalarQueryParameter("fence_claimed", "TIMESTAMP", self.claimed_at),
            bigquery.ScalarQueryParameter("fence_done", "STRING", DONE),
        ]


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

    def lookup_markers_many(self, markers: TableRef, wanted: dict[str, list[str]]) -> dict[str, MarkerLookup]:
        """`lookup_markers` for several tables in ONE query: table -> its lookup."""
        sql = (
            f"SELECT table_name, dedup_id, state, marked_at FROM {markers.sql} "
            "WHERE table_name IN UNNEST(@tables) AND dedup_id IN UNNEST(@ids) "
            "AND marked_at >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @hours HOUR)"
        )
        all_ids = sorted({i for ids in wanted.values() for i in ids})
        params = [
            bigquery.ArrayQueryParameter("tables", "STRING", sorted(wanted)),
            bigquery.ArrayQueryParameter("ids", "STRING", all_ids),
            bigquery.ScalarQueryParameter("hours", "INT64", MARKER_RETENTION_DAYS * 24),
        ]
        asked = {table: set(ids) for table, ids in wanted.items()}
        found = {table: MarkerLookup() for table in wanted}
        what = f"dedup lookup for {len(wanted)} tables"
        for table, dedup_id, state, at in self.client.query(sql, params, "query", what):
            if dedup_id not in asked.get(table, ()):  # another table's id matched by the cross product
                continue
            lookup = found[table]
            if state == DONE:
                lookup.done.add(dedup_id)
            else:
                lookup.intents.add(dedup_id)
                earliest = lookup.unfinished.get(dedup_id)
                lookup.unfinished[dedup_id] = at if earliest is None else min(earliest, at)
        for lookup in found.values():
            for dedup_id in lookup.done:
                lookup.unfinished.pop(dedup_id, None)
        return found

    def not_owned(self, markers: TableRef, wanted: dict[str, tuple[list[str], str]]) -> set[str]:
        """Tables (of `wanted`: table -> (ids, attempt token)) where that attempt no longer
        owns every id: a newer intent of another attempt, or another attempt's `done`."""
        sql = (
            f"SELECT table_name, dedup_id, state, attempt, marked_at FROM {markers.sql} "
            "WHERE table_name IN UNNEST(@tables) AND dedup_id IN UNNEST(@ids) "
            "AND marked_at >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @hours HOUR)"
        )
        params = [
            bigquery.ArrayQueryParameter("tables", "STRING", sorted(wanted)),
            bigquery.ArrayQueryParameter("ids", "STRING", sorted({i for ids, _ in wanted.values() for i in ids})),
            bigquery.ScalarQueryParameter("hours", "INT64", MARKER_RETENTION_DAYS * 24),
        ]
        newest: dict[tuple[str, str], tuple[dt.datetime, str | None]] = {}
        lost: set[str] = set()
        what = f"owner check for {len(wanted)} tables"
        for table, dedup_id, state, attempt, at in self.client.query(sql, params, "query", what):
            if table not in wanted or dedup_id not in wanted[table][0]:
                continue  # another table's id matched by the cross product
            if state == DONE:
                if attempt != wanted[table][1]:
                    lost.add(table)
                continue
            seen = newest.get((table, dedup_id))
            if seen is None or at > seen[0]:
                newest[(table, dedup_id)] = (at, attempt)
        for table, (ids, attempt) in wanted.items():
            if any(newest.get((table, i), (None, None))[1] != attempt for i in ids):
                lost.add(table)
        return lost

    # ----------------------------------------------------------------- clean-up

    def clean(
        self, ref: TableRef, ids: list[str], since: dt.datetime | None, *, partitioned: bool, fence: OwnerFence
    ) -> int:
        """Delete rows an unfinished earlier attempt of `ids` wrote; rows deleted.

        Those rows were written after the attempt's intent (`since`), so only partitions
        from that day on are read, plus rows not yet in a partition (NULL
        `_PARTITIONTIME` while in the write buffer). Fenced: run late, after a newer
        attempt claimed `ids` and wrote them, it must not take that attempt's rows.
        """
        sql = f"DELETE FROM {ref.sql} WHERE {DEDUP_COLUMN} IN UNNEST(@ids)"
        params: list = [bigquery.ArrayQueryParameter("ids", "STRING", ids)]
        if partitioned and since is not None:
            sql += " AND (_PARTITIONTIME IS NULL OR _PARTITIONTIME >= TIMESTAMP_TRUNC(@since, DAY))"
            params.append(bigquery.ScalarQueryParameter("since", "TIMESTAMP", since))
        elif partitioned:
            sql += f" AND {EVERY_PARTITION}"
        sql += f" AND {fence.sql()}"
        return self.dml(sql, params + fence.params(), dml_job_id(ref, ids, "clean", fence.attempt), f"clean-up in {ref.table}")

    # ----------------------------------------------------------------- deletes

    def delete_statements(
        self, ref: TableRef, step: planner.DeleteRows, fence: OwnerFence, *, partitioned: bool = False
    ) -> list[tuple[str, list]]:
        """One DELETE per up to MAX_DELETES_PER_STATEMENT deletes (deletes commute); on a
        partitioned table with a filter on every partition (`require_partition_filter`).
        Fenced: a stale attempt's late delete must not remove rows a newer one wrote since."""
        statements: list[tuple[str, list]] = []
        where = f"DELETE FROM {ref.sql} WHERE {EVERY_PARTITION} AND (" if partitioned else f"DELETE FROM {ref.sql} WHERE ("
        fenced = f") AND {fence.sql()}"
        clauses: list[str] = []
        params: list = []
        for conditions in step.conditions:
            parts = [
                self.types.condition(quote_column(col), typ, value, f"p{len(params)}", params)
                for col, typ, value in conditions
            ]
            clauses.append("(" + " AND ".join(parts) + ")")
            if len(clauses) >= MAX_DELETES_PER_STATEMENT or len(params) >= MAX_PARAMS_PER_STATEMENT:
                statements.append((where + " OR ".join(clauses) + fenced, params + fence.params()))
                clauses, params = [], []
        if clauses:
            statements.append((where + " OR ".join(clauses) + fenced, params + fence.params()))
        return statements

    def dml(self, sql: str, params: list, job_id: str, what: str) -> int:
        return self.client.dml(sql, params, job_id, what)
