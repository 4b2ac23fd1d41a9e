"""Upserts on BigQuery: one MERGE per run of upserts (per chunk of a large run).

The run's last row per key (`UpsertRows.last_rows`) is bound as one `ARRAY<STRUCT>`
query parameter, and one statement replaces the rows of those keys:

    MERGE t USING (rows) S ON FALSE
    WHEN NOT MATCHED BY SOURCE AND <t's key is among the rows' keys> THEN DELETE
    WHEN NOT MATCHED THEN INSERT (...)

`ON FALSE` rather than `WHEN MATCHED THEN UPDATE`: a table keyed after plain inserts may
hold several rows of one key, and an UPDATE would keep them all; this form deletes every
row of the key and inserts the one, atomically (a MERGE is one statement:
https://cloud.google.com/bigquery/docs/reference/standard-sql/dml-syntax#merge_statement,
whose `NOT MATCHED BY SOURCE ... THEN DELETE` is the "replace" pattern of
https://cloud.google.com/bigquery/docs/using-dml-with-partitioned-tables). Each
inserted row carries its message's dedup_id, so the clean-up of an unfinished attempt
finds it like an appended row.

Keys in a chunk are distinct, so chunks commute. Every value is bound; column names are
validated identifiers and the struct's fields are positional (`c0`, `c1`, ...).
"""

from __future__ import annotations

from typing import Any

from google.cloud import bigquery

from app.warehouse import plan as planner
from app.warehouse.bigquery.queries import EVERY_PARTITION, OwnerFence
from app.warehouse.bigquery.schema import DEDUP_COLUMN, TableRef, quote_column
from app.warehouse.bigquery.types import TypeMapper

# Rows per MERGE: a query request with its parameters stays well below Google's 10 MB
# request limit (https://cloud.google.com/bigquery/quotas#query_jobs).
MAX_UPSERT_ROWS_PER_STATEMENT = 2000
MAX_UPSERT_BYTES_PER_STATEMENT = 2_000_000
_DEDUP_FIELD = "d"


def merge_sql(ref: TableRef, step: planner.UpsertRows, types: TypeMapper, fence: OwnerFence, *, partitioned: bool) -> str:
    """The MERGE of one chunk of `step`'s rows, bound as `@rows` (see `rows_param`); both
    of its actions fenced, so a stale attempt's late MERGE changes nothing (`OwnerFence`)."""
    position = {name: i for i, (name, _) in enumerate(step.columns)}
    fields = ", ".join(f"r.c{i} AS c{i}" for i in range(len(step.columns)))
    same_key = " AND ".join(
        f"{types.value_sql(typ, f'k.c{position[name]}')} = T.{quote_column(name)}" for name, typ in step.key
    )
    # a table requiring a partition filter refuses a statement without one (see queries.py)
    every = f"{EVERY_PARTITION} AND " if partitioned else ""
    targets = ", ".join([*(quote_column(name) for name, _ in step.columns), DEDUP_COLUMN])
    values = ", ".join([*(types.value_sql(typ, f"S.c{i}") for i, (_, typ) in enumerate(step.columns)), f"S.{_DEDUP_FIELD}"])
    return (
        f"MERGE {ref.sql} T USING (SELECT {fields}, r.{_DEDUP_FIELD} AS {_DEDUP_FIELD} FROM UNNEST(@rows) AS r) S ON FALSE "
        f"WHEN NOT MATCHED BY SOURCE AND {every}EXISTS (SELECT 1 FROM UNNEST(@rows) AS k WHERE {same_key}) "
        f"AND {fence.sql()} THEN DELETE "
        f"WHEN NOT MATCHED AND {fence.sql()} THEN INSERT ({targets}) VALUES ({values})"
    )


def upsert_statements(
    ref: TableRef, step: planner.UpsertRows, types: TypeMapper, fence: OwnerFence, *, partitioned: bool
) -> list[tuple[str, list]]:
    """(sql, params) per chunk of the run's last rows per key; converted here, before anything is written."""
    kept = step.last_rows().to_pylist()
    values = step.rows.canonical_values()
    dedup_ids = step.rows.dedup_ids()
    columns = [(typ, values[name]) for name, typ in step.columns]
    sql = merge_sql(ref, step, types, fence, partitioned=partitioned)
    statements: list[tuple[str, list]] = []
    chunk: list[bigquery.StructQueryParameter] = []
    size = 0
    for row in kept:
        fields = [types.param(f"c{i}", typ, vals[row]) for i, (typ, vals) in enumerate(columns)]
        fields.append(bigquery.ScalarQueryParameter(_DEDUP_FIELD, "STRING", dedup_ids[row].as_py()))
        chunk.append(bigquery.StructQueryParameter(None, *fields))
        size += _size(fields)
        if len(chunk) >= MAX_UPSERT_ROWS_PER_STATEMENT or size >= MAX_UPSERT_BYTES_PER_STATEMENT:
            statements.append((sql, [bigquery.ArrayQueryParameter("rows", "STRUCT", chunk), *fence.params()]))
            chunk, size = [], 0
    if chunk:
        statements.append((sql, [bigquery.ArrayQueryParameter("rows", "STRUCT", chunk), *fence.params()]))
    return statements


def _size(fields: list[bigquery.ScalarQueryParameter]) -> int:
    """About the bytes a row's fields take in the request (JSON, with names and types)."""
    return sum(40 + len(_text(f.value)) for f in fields)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
