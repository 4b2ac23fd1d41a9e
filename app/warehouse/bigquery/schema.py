"""Table and schema state: create tables, add columns, the markers table.

The schema of every user table is cached, so the metadata-update quota (5 per 10 s per
table) is spent only when columns really are new. Adding columns starts from the freshly
fetched server schema and sends it back with its etag (`tables.patch` fails with 412 if
someone changed the table in between), so properties a user set on existing columns
(descriptions, policy tags, ...) survive. When another writer got there first
(`SchemaRaced`), the warehouse re-reads the table and re-plans.

User tables are partitioned by ingestion day (`_PARTITIONTIME`) unless
`bigquery_partitioning=none`, and clustered on the `bigquery_clustering` columns they
have (https://cloud.google.com/bigquery/docs/partitioned-tables#ingestion_time).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from google.cloud import bigquery

from app.schema.identifiers import IDENTIFIER, INTERNAL_PREFIX, MAX_COLUMN_NAME
from app.settings import Settings
from app.warehouse import plan as planner
from app.warehouse.bigquery import errors
from app.warehouse.bigquery.client import BigQueryClient
from app.warehouse.bigquery.types import TypeMapper

DEDUP_COLUMN = INTERNAL_PREFIX + "dedup_id"
MARKERS_TABLE = INTERNAL_PREFIX + "markers"
# Markers outlive any redelivery: Pub/Sub keeps unacked messages 7 days by default
# (https://cloud.google.com/pubsub/docs/subscription-properties#retention_duration), plus a day.
MARKER_RETENTION_DAYS = 8
MAX_CLUSTERING_COLUMNS = 4  # https://cloud.google.com/bigquery/docs/clustered-tables#limitations

DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")


def quote_column(name: str) -> str:
    if not IDENTIFIER.match(name) or len(name) > MAX_COLUMN_NAME:
        raise ValueError(f"invalid column name {name!r}")
    return f"`{name}`"


@dataclass(frozen=True, slots=True)
class TableRef:
    project: str
    dataset: str
    table: str

    @property
    def sql(self) -> str:
        return f"`{self.project}.{self.dataset}.{self.table}`"

    @property
    def api(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def default_stream(self) -> str:
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}/streams/_default"


@dataclass(slots=True)
class TableState:
    schema: planner.Schema  # user columns: lower name -> (name, activity type)
    column_types: dict[str, str]  # column name -> BigQuery type as stored (incl. hidden)
    has_dedup_column: bool
    partitioned_by_ingestion: bool


class SchemaRaced(Exception):
    """Another writer changed the table's schema first: re-read and re-plan."""


def dedup_field() -> bigquery.SchemaField:
    return bigquery.SchemaField(
        DEDUP_COLUMN, "STRING", mode="NULLABLE", description="ingest: dedup_id of the message that wrote the row"
    )


class TableSchemas:
    """Cached table states of one dataset, and the calls that change them."""

    def __init__(self, settings: Settings, client: BigQueryClient, types: TypeMapper) -> None:
        self.client = client
        self.types = types
        self.partitioning = settings.bigquery_partitioning
        self.clustering = [c.strip() for c in settings.bigquery_clustering.split(",") if c.strip()][
            :MAX_CLUSTERING_COLUMNS
        ]
        self._states: dict[str, TableState] = {}
        self._lock = threading.Lock()
        self._markers_ready = False
        self._markers_lock = threading.Lock()

    # ----------------------------------------------------------------- state

    def state(self, table: str) -> TableState | None:
        """The cached state, read from BigQuery when not cached (a missing table is not cached)."""
        with self._lock:
            state = self._states.get(table)
        return state if state is not None else self.fetch(table)

    def fetch(self, table: str) -> TableState | None:
        return self._remember(table, self.client.get_table(self._ref(table).api))

    def forget(self) -> None:
        with self._lock:
            self._states.clear()
            self._markers_ready = False

    def _ref(self, table: str) -> TableRef:
        return TableRef(self.client.project, self.client.dataset, table)

    def _remember(self, table: str, bq_table: bigquery.Table | None) -> TableState | None:
        state = None if bq_table is None else self._state_of(bq_table)
        with self._lock:
            if state is None:
                self._states.pop(table, None)
            else:
                self._states[table] = state
        return state

    def _state_of(self, bq_table: bigquery.Table) -> TableState:
        schema: planner.Schema = {}
        column_types: dict[str, str] = {}
        has_dedup = False
        for f in bq_table.schema:
            column_types[f.name] = f.field_type
            if f.name.lower() == DEDUP_COLUMN:
                has_dedup = True
                continue
            schema[f.name.lower()] = (f.name, self.types.activity_type(f))
        tp = bq_table.time_partitioning
        return TableState(schema, column_types, has_dedup, partitioned_by_ingestion=tp is not None and tp.field is None)

    # ----------------------------------------------------------------- changes

    def create(self, ref: TableRef, columns: list[planner.Column]) -> TableState:
        """Create the table with `columns` (+ the hidden dedup column). `SchemaRaced` if it exists."""
        t = bigquery.Table(ref.api, schema=[*(self.types.field(n, typ) for n, typ in columns), dedup_field()])
        t.description = "ingest pipeline table; column descriptions carry the activity types"
        if self.partitioning == "day":
            t.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY)
        clustering = self._clustering_for({n.lower(): n for n, _ in columns})
        if clustering:
            t.clustering_fields = clustering
        try:
            created = self.client.create_table(t)
        except errors.TerminalWarehouseError as exc:
            if errors.is_schema_conflict(exc.__cause__ or exc):
                raise SchemaRaced(str(exc)) from exc
            raise
        state = self._remember(ref.table, created)
        assert state is not None
        return state

    def add_columns(self, ref: TableRef, known: TableState, columns: list[planner.Column]) -> TableState:
        """Add `columns` (and the dedup column if missing) with one etag-conditional patch.

        Starts from the server's current schema; `SchemaRaced` when it differs from
        `known` (the plan was made against a stale schema) or the patch lost a race.
        """
        fresh = self.client.get_table(ref.api)
        if fresh is None:
            self._remember(ref.table, None)
            raise SchemaRaced(f"table {ref.table} is gone")
        fresh_state = self._remember(ref.table, fresh)
        assert fresh_state is not None
        if set(fresh_state.column_types) != set(known.column_types):
            raise SchemaRaced("table changed since it was cached")
        fields = [self.types.field(n, typ) for n, typ in columns]
        if not fresh_state.has_dedup_column:
            fields.append(dedup_field())
        existing = {f.name.lower() for f in fresh.schema}
        to_add = [f for f in fields if f.name.lower() not in existing]
        if not to_add:
            return fresh_state
        # the server's fields untouched, sent with its etag: a stale one is refused with 412
        # (https://cloud.google.com/bigquery/docs/managing-table-schemas#add_columns_to_a_tables_schema_definition)
        fresh.schema = [*fresh.schema, *to_add]
        patched = ["schema"]
        if not fresh.clustering_fields:
            clustering = self._clustering_for({f.name.lower(): f.name for f in fresh.schema})
            if clustering:
                fresh.clustering_fields = clustering
                patched.append("clustering_fields")
        try:
            updated = self.client.update_table(fresh, patched)
        except errors.TerminalWarehouseError as exc:
            if errors.is_schema_conflict(exc.__cause__ or exc):
                raise SchemaRaced(str(exc)) from exc
            raise
        state = self._remember(ref.table, updated)
        assert state is not None
        return state

    def _clustering_for(self, columns_by_lower: dict[str, str]) -> list[str]:
        return [columns_by_lower[c.lower()] for c in self.clustering if c.lower() in columns_by_lower]

    # ----------------------------------------------------------------- markers table

    def ensure_markers(self) -> TableRef:
        """The markers table (dedup intents and completions), created on first use."""
        ref = self._ref(MARKERS_TABLE)
        if self._markers_ready:
            return ref
        with self._markers_lock:  # tables apply on several threads: create it once
            if not self._markers_ready:
                self._create_markers(ref)
                self._markers_ready = True
        return ref

    def _create_markers(self, ref: TableRef) -> None:
        if self.client.get_table(ref.api) is None:
            t = bigquery.Table(
                ref.api,
                schema=[
                    bigquery.SchemaField("dedup_id", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("state", "STRING", mode="REQUIRED"),  # 'intent' | 'done'
                    bigquery.SchemaField("marked_at", "TIMESTAMP", mode="REQUIRED"),
                ],
            )
            t.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY,
                field="marked_at",
                expiration_ms=MARKER_RETENTION_DAYS * 86_400_000,
            )
            t.clustering_fields = ["table_name", "dedup_id"]
            t.description = "ingest pipeline: per dedup_id an 'intent' row before its data, a 'done' row after"
            try:
                self.client.create_table(t, exists_ok=True)
            except errors.TerminalWarehouseError as exc:
                if not errors.is_not_found(exc):
                    raise
                self.client.create_dataset()  # the dataset itself is missing
                self.client.create_table(t, exists_ok=True)
