"""The tables file's table options on BigQuery, kept in the table's own metadata.

- `description`, `labels`: the table's description and labels; labels the file does not
  name are left as they are (https://cloud.google.com/bigquery/docs/managing-tables#updating_a_tables_description,
  https://cloud.google.com/bigquery/docs/updating-labels).
- `clustering`: the clustering fields, those of the listed columns the table has (a
  clustering field must be a column; the rest follow when they are added)
  (https://cloud.google.com/bigquery/docs/manage-clustered-tables#modifying-cluster-spec).
- `partition_expiration_days`: the partitions' expiration
  (https://cloud.google.com/bigquery/docs/managing-partitioned-tables#partition-expiration).
- `require_partition_filter`: queries must filter on `_PARTITIONTIME`
  (https://cloud.google.com/bigquery/docs/managing-partitioned-tables#require-filter);
  the pipeline's own DML always does (queries.py).

The last two need a partitioned table: not applicable with `BIGQUERY_PARTITIONING=none`
(capabilities) or on a table someone created unpartitioned (reported per table).
"""

from __future__ import annotations

from typing import Any, Mapping

from google.cloud import bigquery

from app.warehouse.base import OptionsOutcome, option_change

ANY_TABLE = frozenset({"description", "labels", "clustering"})
PARTITIONED_TABLE = frozenset({"partition_expiration_days", "require_partition_filter"})
DAY_MS = 86_400_000


def bigquery_table_options(partitioned: bool) -> frozenset[str]:
    return ANY_TABLE | PARTITIONED_TABLE if partitioned else ANY_TABLE


def clustering_of(options: Mapping[str, Any], columns_by_lower: Mapping[str, str]) -> list[str]:
    """The file's clustering columns the table has, in the file's order."""
    return [columns_by_lower[c.lower()] for c in options.get("clustering", ()) if c.lower() in columns_by_lower]


def set_options(table: bigquery.Table, options: Mapping[str, Any], outcome: OptionsOutcome) -> list[str]:
    """Set on `table` the options that differ (recorded in `outcome`); the fields to patch."""
    fields: list[str] = []

    def change(field: str, name: str, old: Any, new: Any) -> None:
        outcome.changes.append(option_change(name, old, new))
        fields.append(field)

    if "description" in options and table.description != options["description"]:
        change("description", "description", table.description, options["description"])
        table.description = options["description"]
    if "labels" in options:
        current = dict(table.labels or {})
        merged = {**current, **options["labels"]}
        if merged != current:
            change("labels", "labels", current, merged)
            table.labels = merged
    if "clustering" in options:
        wanted = clustering_of(options, {f.name.lower(): f.name for f in table.schema})
        if wanted and wanted != list(table.clustering_fields or []):
            change("clustering_fields", "clustering", table.clustering_fields, wanted)
            table.clustering_fields = wanted
    partitioning = table.time_partitioning
    for name in sorted(PARTITIONED_TABLE & set(options)):
        if partitioning is None:
            outcome.not_applicable.append(f"{name} (the table is not partitioned)")
        elif name == "partition_expiration_days":
            wanted_ms = round(options[name] * DAY_MS)
            if partitioning.expiration_ms != wanted_ms:
                old = None if partitioning.expiration_ms is None else partitioning.expiration_ms / DAY_MS
                change("time_partitioning", name, old, options[name])
                partitioning.expiration_ms = wanted_ms
                table.time_partitioning = partitioning
        elif bool(table.require_partition_filter) != options[name]:
            change("require_partition_filter", name, table.require_partition_filter, options[name])
            table.require_partition_filter = options[name]
    return fields


def apply_options(client: Any, table_id: str, options: Mapping[str, Any], outcome: OptionsOutcome) -> bigquery.Table | None:
    """Patch an existing table's options to `options`; the updated table (None: no table)."""
    current = client.get_table(table_id)
    if current is None:
        return None
    fields = set_options(current, options, outcome)
    return client.update_table(current, fields) if fields else current
