"""The warehouse seam: where the subscriber applies activities.

Errors are split the way a retry loop needs them: a `TransientWarehouseError` means
"nothing was committed, try the same messages again later"; a per-activity
`Rejection` means "this activity can never apply" and goes to the dead-letter store.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from app.schema import identifiers
from app.schema.activity import Activity
from app.messages.envelope import Envelope
from app.warehouse.types import TypeMapper


class TransientWarehouseError(Exception):
    """The warehouse is unreachable, locked or throttled; nothing was committed.

    `retry_after`: seconds the warehouse asks to wait before trying again (None: the
    caller's own backoff decides).
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class WarehouseUnavailable(TransientWarehouseError):
    """The warehouse refuses this process as a whole (a permission or credential it lacks,
    an API or feature not enabled): no message is at fault, so none is dead-lettered;
    the subscriber stops pulling and probes slowly until an apply succeeds.

    `reason`: a short label for logs and metrics ("permission_denied",
    "unauthenticated", "credentials", "not_enabled").
    """

    def __init__(self, *args: object, reason: str, retry_after: float | None = None) -> None:
        super().__init__(*args, retry_after=retry_after)
        self.reason = reason


class TerminalWarehouseError(Exception):
    """These envelopes can never apply as they are (e.g. a value the warehouse refuses).

    Nothing was committed. The pipeline retries each envelope alone to find the culprit
    and dead-letters it after `max_delivery_attempts`; the others still apply.
    Any exception other than `TransientWarehouseError` is treated the same way.
    """


class WarehouseQueryError(Exception):
    """A read-only query given to `Warehouse.query` failed (bad SQL, unknown table)."""


class WarehouseLocked(WarehouseQueryError):
    """A read-only opening found the warehouse held by its writer (read through the writer instead)."""


class QueryResult(tuple):
    """`(columns, rows)` of a read-only query, plus `types`: each column's ACTIVITY type.

    A plain 2-tuple to unpack, so callers that only need the values stay simple; the
    types let `app.pipeline.render` show a value as the warehouse stores it (GEOMETRY
    bytes as WKT, JSON text as JSON) without knowing the warehouse. A type is read from
    the column's warehouse type through the backend's type mapper, so a column type
    two activity types share reads as the first (DuckDB VARCHAR: "string"); None for a
    column no activity type is stored as (HUGEINT sums, INTERVAL, lists, structs).
    """

    types: list[str | None]

    def __new__(cls, columns: list[str], rows: list[tuple], types: list[str | None]) -> "QueryResult":
        result = super().__new__(cls, (columns, rows))
        result.types = types
        return result


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, declared as data (after dlt's destination capabilities).

    The identifier rules default to the one copy in `app.schema.identifiers` (the API
    edge checks names against it); a backend states only where it differs.
    """

    transactional: bool  # rows + applied ids commit atomically
    max_alters_per_statement: int | None  # None: unlimited
    supports_geometry: bool
    # Applies of different tables may run at once on separate threads. False: the
    # subscriber serializes every apply (one connection that is not thread-safe).
    concurrent_tables: bool = False
    identifier_pattern: re.Pattern[str] = identifiers.IDENTIFIER  # table and column names
    max_table_name_length: int = identifiers.MAX_TABLE_NAME
    max_column_name_length: int = identifiers.MAX_COLUMN_NAME
    reserved_column_prefixes: tuple[str, ...] = identifiers.RESERVED_COLUMN_PREFIXES  # lower case, any case refused
    internal_prefix: str = identifiers.INTERNAL_PREFIX  # the pipeline's own tables and columns
    max_columns: int | None = None  # per table; None: no limit the pipeline knows of
    # Schema changes an apply may make; columns are never dropped, renamed or retyped.
    alterations: tuple[str, ...] = ("create_table", "add_column")
    # How many tables' batches the subscriber hands to one `apply_many`.
    max_tables_per_apply: int = 1


@dataclass(frozen=True, slots=True)
class Rejection:
    """An activity that can never apply (type conflict, unknown column in a delete)."""

    dedup_id: str
    index: int  # position of the activity inside its envelope
    activity: Activity
    reason: str


@dataclass(slots=True)
class ApplyResult:
    applied_envelopes: int = 0
    skipped_duplicates: int = 0  # envelopes whose dedup_id was already applied
    rows_inserted: int = 0
    rows_deleted: int = 0
    noop_deletes: int = 0  # deletes on a table that does not exist
    schema_changes: int = 0  # tables created + columns added
    rejections: list[Rejection] = field(default_factory=list)


class Warehouse(abc.ABC):
    capabilities: Capabilities
    name: str = "unnamed"  # the registry's name for it (`WAREHOUSE`), set when opened
    type_mapper: TypeMapper  # activity type <-> this backend's column types

    @abc.abstractmethod
    def apply(self, table: str, envelopes: Sequence[Envelope]) -> ApplyResult:
        """Apply the envelopes of one table, in order, exactly once per dedup_id.

        Consecutive inserts become one bulk write, a delete is a barrier. Activities that
        can never apply come back as `rejections` (the rest still apply). Raises
        `TransientWarehouseError` when nothing could be committed.
        """

    def apply_many(self, batches: Sequence[tuple[str, Sequence[Envelope]]]) -> list[ApplyResult | Exception]:
        """Apply several tables' batches; one outcome per batch, in order: its result, or the
        exception `apply` raised for it (nothing of that table committed).

        Each table keeps `apply`'s meaning and isolation: a table that fails never stops
        the others. This default applies them one by one; a backend overrides it to share
        one transaction, one marker write or parallel connections among them.
        """
        outcomes: list[ApplyResult | Exception] = []
        for table, envelopes in batches:
            try:
                outcomes.append(self.apply(table, envelopes))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    @abc.abstractmethod
    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        """Run a read-only query: (column names, rows), with the columns' types."""

    @abc.abstractmethod
    def table_schema(self, table: str) -> dict[str, str] | None:
        """Column name -> activity type name, or None if the table does not exist."""

    # Not abstract: a test double that never lists tables need not implement them.
    def list_tables(self) -> list[str]:
        """The user tables (internal `_ingest_*` ones left out), sorted by name."""
        raise NotImplementedError

    def count_rows(self, tables: Sequence[str]) -> dict[str, int]:
        """Exact row counts of those of `tables` that exist as user tables (others left out).

        Names are validated before they reach SQL; an invalid one is left out too.
        """
        raise NotImplementedError

    def ready(self) -> tuple[bool, str]:
        return True, "ok"

    def close(self) -> None:
        """Release the connection / file lock."""
