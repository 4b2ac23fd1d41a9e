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

import collections
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from google.cloud import bigquery

from app.schema.identifiers import IDENTIFIER, INTERNAL_PREFIX, MAX_COLUMN_NAME
from app.settings import Settings
from app.warehouse import plan as planner
from app.warehouse.bigquery import errors
from app.warehouse.base import OptionsOutcome
from app.warehouse.bigquery.client import LIST_PAGE_SIZE, BigQueryClient
from app.warehouse.bigquery.options import clustering_of, set_options
from app.warehouse.bigquery.types import TypeMapper
from app.warehouse.bigquery.widening import with_activity_type

DEDUP_COLUMN = INTERNAL_PREFIX + "dedup_id"
MARKERS_TABLE = INTERNAL_PREFIX + "markers"
# Markers outlive any redelivery: Pub/Sub keeps unacked messages 7 days by default
# (https://cloud.google.com/pubsub/docs/subscription-properties#retention_duration), plus a day.
MARKER_RETENTION_DAYS = 8
# the attempt that wrote a marker: the newest intent's attempt owns the id (warehouse.py)
MARKER_ATTEMPT = bigquery.SchemaField("attempt", "STRING", mode="NULLABLE")
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
    def path(self) -> str:
        """The table's resource name in the Storage Write API."""
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}"

    @property
    def default_stream(self) -> str:
        return f"{self.path}/streams/_default"


@dataclass(slots=True)
class TableState:
    schema: planner.Schema  # user columns: lower name -> (name, activity type)
    column_types: dict[str, str]  # column name -> BigQuery type as stored (incl. hidden)
    has_dedup_column: bool
    partitioned_by_ingestion: bool


class SchemaRaced(Exception):
    """Another writer changed the table's schema first: re-read and re-plan."""


DEDUP_DESCRIPTION = "ingest: dedup_id of the message that wrote the row"
# The table's key (fixed by its first upsert) is recorded in the hidden dedup column's
# description: our own column, patched with the schema's etag like added columns, and
# never touched by the tables file's options. Not every key is declarable as a primary key.
KEY_NOTE = "; key: "
# Primary key columns BigQuery allows
# (https://cloud.google.com/bigquery/docs/information-schema-table-constraints, limitations).
DECLARABLE_KEY_TYPES = frozenset({"BIGNUMERIC", "BOOL", "DATE", "DATETIME", "INT64", "NUMERIC", "STRING", "TIMESTAMP"})


def dedup_field(key: tuple[str, ...] | None = None) -> bigquery.SchemaField:
    description = DEDUP_DESCRIPTION + (KEY_NOTE + json.dumps(list(key)) if key else "")
    return bigquery.SchemaField(DEDUP_COLUMN, "STRING", mode="NULLABLE", description=description)


def recorded_key(description: str | None) -> tuple[str, ...] | None:
    """The key a dedup column's description records (None: the table has none)."""
    if not description or KEY_NOTE not in description:
        return None
    try:
        names = json.loads(description.split(KEY_NOTE, 1)[1])
    except ValueError:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)


class TableSchemas:
    """Cached table states of one dataset, and the calls that change them."""

    def __init__(
        self,
        settings: Settings,
        client: BigQueryClient,
        types: TypeMapper,
        options_for: Callable[[str], Mapping[str, Any]] = lambda table: {},
    ) -> None:
        self.client = client
        self.types = types
        self.options_for = options_for  # table -> its tables-file options (those BigQuery applies)
        self.partitioning = settings.bigquery_partitioning
        self.clustering = [c.strip() for c in settings.bigquery_clustering.split(",") if c.strip()][
            :MAX_CLUSTERING_COLUMNS
        ]
        # least recently used first; bounded so memory follows the pull, not the number of tables
        self._states: collections.OrderedDict[str, TableState] = collections.OrderedDict()
        self.cache_size = settings.bigquery_table_cache_size
        self._lock = threading.Lock()
        self._markers_ready = False
        self._markers_lock = threading.Lock()
        self._listing_calls = 1  # tables.list pages the dataset took when last listed

    # ----------------------------------------------------------------- state

    def absent(self, tables: Sequence[str]) -> set[str]:
        """Of `tables`, those not cached that the dataset's listing lacks, or nothing when
        listing costs as many calls as the gets it may save. A table new to this cache
        would cost a `tables.get` each; one listing finds which of them are missing, and
        those are created without reading them first. A listing may lag a table made just
        now, so "absent" is only a hint: a create of a table that exists is refused (409,
        `SchemaRaced`: re-read and re-plan), and a plan that creates nothing reads the
        table itself (`warehouse._plan_and_prepare_schema`)."""
        with self._lock:
            unknown = [t for t in dict.fromkeys(tables) if t not in self._states]
        if len(unknown) <= self._listing_calls:
            return set()
        listed = set(self.client.list_tables())
        self._listing_calls = max(1, -(-len(listed) // LIST_PAGE_SIZE))
        return {t for t in unknown if t not in listed}

    def state(self, table: str) -> TableState | None:
        """The cached state, read from BigQuery when not cached (a missing table is not cached)."""
        with self._lock:
            state = self._states.get(table)
            if state is not None:
                self._states.move_to_end(table)
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
                self._states.move_to_end(table)
                while len(self._states) > self.cache_size:
                    self._states.popitem(last=False)
        return state

    def _state_of(self, bq_table: bigquery.Table) -> TableState:
        schema = planner.Schema()
        column_types: dict[str, str] = {}
        has_dedup = False
        for f in bq_table.schema:
            column_types[f.name] = f.field_type
            if f.name.lower() == DEDUP_COLUMN:
                has_dedup = True
                schema.key = recorded_key(f.description)
                continue
            schema[f.name.lower()] = (f.name, self.types.activity_type(f))
        tp = bq_table.time_partitioning
        return TableState(schema, column_types, has_dedup, partitioned_by_ingestion=tp is not None and tp.field is None)

    # ----------------------------------------------------------------- changes

    def create(
        self, ref: TableRef, columns: list[planner.Column], key: tuple[str, ...] | None = None, declare: bool = False
    ) -> TableState:
        """Create the table with `columns` (+ the hidden dedup column, recording `key`).
        `declare`: also declare `key` as `PRIMARY KEY NOT ENFORCED` where BigQuery allows
        its types. `SchemaRaced` if it exists."""
        fields = [self.types.field(n, typ) for n, typ in columns]
        t = bigquery.Table(ref.api, schema=[*fields, dedup_field(key)])
        if key and declare:
            types = {f.name: f.field_type for f in fields}
            if all(types.get(name) in DECLARABLE_KEY_TYPES for name in key):
                # https://cloud.google.com/bigquery/docs/primary-foreign-keys
                t.table_constraints = bigquery.table.TableConstraints(
                    primary_key=bigquery.table.PrimaryKey(columns=list(key)), foreign_keys=None
                )
        t.description = "ingest pipeline table; column descriptions carry the activity types"
        if self.partitioning == "day":
            t.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY)
        clustering = self._clustering_for({n.lower(): n for n, _ in columns}, ref.table)
        if clustering:
            t.clustering_fields = clustering
        set_options(t, self.options_for(ref.table), OptionsOutcome())  # the tables file's, at creation
        return self._saved(ref, lambda: self.client.create_table(t))

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
            clustering = self._clustering_for({f.name.lower(): f.name for f in fresh.schema}, ref.table)
            if clustering:
                fresh.clustering_fields = clustering
                patched.append("clustering_fields")
        return self._saved(ref, lambda: self.client.update_table(fresh, patched))

    def record_key(self, ref: TableRef, known: TableState, key: tuple[str, ...]) -> TableState:
        """Record `key` (the table's first upsert fixed it) in the dedup column's description,
        with one etag-conditional patch; `SchemaRaced` as for `add_columns`. Not declared as
        a primary key: the rows already there may share a key until upserts replace them,
        and BigQuery trusts an unenforced key when it plans queries."""
        fresh = self.client.get_table(ref.api)
        if fresh is None:
            self._remember(ref.table, None)
            raise SchemaRaced(f"table {ref.table} is gone")
        fresh_state = self._remember(ref.table, fresh)
        assert fresh_state is not None
        if set(fresh_state.column_types) != set(known.column_types) or fresh_state.schema.key not in (None, key):
            raise SchemaRaced("table changed since it was cached")
        if fresh_state.schema.key == key:
            return fresh_state
        fresh.schema = [dedup_field(key) if f.name.lower() == DEDUP_COLUMN else f for f in fresh.schema]
        return self._saved(ref, lambda: self.client.update_table(fresh, ["schema"]))

    # ----------------------------------------------------------------- type widening

    def widen(self, ref: TableRef, columns: list[tuple[str, str, str]]) -> TableState:
        """Widen `columns` (name, from, to): one DDL each, then one patch of their
        descriptions (see widening.py). `SchemaRaced` if the table is gone or changed."""
        fresh = self.client.get_table(ref.api)
        if fresh is None:
            self._remember(ref.table, None)
            raise SchemaRaced(f"table {ref.table} is gone")
        by_name = {f.name: f for f in fresh.schema}
        for name, old, new in columns:
            current = by_name.get(name)
            if current is None:
                raise SchemaRaced(f"column {name} of {ref.table} is gone")
            if self.types.activity_type_of(current.field_type) == new:
                continue  # an earlier attempt's DDL ran
            sql = f"ALTER TABLE {ref.sql} ALTER COLUMN {quote_column(name)} SET DATA TYPE {self.types.column_type(new)}"
            self.client.query(sql, None, "metadata_update", f"widen {name} of {ref.table} to {new}")
        fresh = self.client.get_table(ref.api)
        if fresh is None:
            raise SchemaRaced(f"table {ref.table} is gone")
        wanted = {name: new for name, _, new in columns}
        fresh.schema = [with_activity_type(f, wanted[f.name]) if f.name in wanted else f for f in fresh.schema]
        return self._saved(ref, lambda: self.client.update_table(fresh, ["schema"]))

    def _saved(self, ref: TableRef, save: Callable[[], bigquery.Table]) -> TableState:
        """`save` (a create or an etag-conditional update) and its result remembered;
        `SchemaRaced` when another writer changed the table first."""
        try:
            saved = save()
        except errors.TerminalWarehouseError as exc:
            if errors.is_schema_conflict(exc.__cause__ or exc):
                raise SchemaRaced(str(exc)) from exc
            raise
        state = self._remember(ref.table, saved)
        assert state is not None
        return state

    def _clustering_for(self, columns_by_lower: dict[str, str], table: str) -> list[str]:
        # the tables file's clustering for this table, else BIGQUERY_CLUSTERING's
        by_file = clustering_of(self.options_for(table), columns_by_lower)
        return by_file or [columns_by_lower[c.lower()] for c in self.clustering if c.lower() in columns_by_lower]

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
        existing = self.client.get_table(ref.api)
        if existing is not None and all(f.name != MARKER_ATTEMPT.name for f in existing.schema):
            # made before attempt tokens: the column is added (NULL in older rows: older attempts)
            existing.schema = [*existing.schema, MARKER_ATTEMPT]
            self.client.update_table(existing, ["schema"])
        if existing is None:
            t = bigquery.Table(
                ref.api,
                schema=[
                    bigquery.SchemaField("dedup_id", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
                    bigquery.SchemaField("state", "STRING", mode="REQUIRED"),  # 'intent' | 'done'
                    bigquery.SchemaField("marked_at", "TIMESTAMP", mode="REQUIRED"),
                    MARKER_ATTEMPT,
                ],
            )
            t.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY,
                field="marked_at",
                expiration_ms=MARKER_RETENTION_DAYS * 86_400_000,
            )
            t.clustering_fields = ["table_name", "dedup_id"]
            t.description = "ingest pipeline: per dedup_id an 'intent' row before its data, a 'done' row after"
            self.client.create_own_table(t)
