"""The bench's estimate of what BigQuery would bill on demand (scripts/bench/billing.py)."""

from __future__ import annotations

from scripts.bench.billing import MIN_BILLED_PER_TABLE, TableSize, job_estimate, value_bytes

MB = 1024 * 1024


def test_values_are_sized_by_google_s_data_size_calculation():
    assert value_bytes("INTEGER", 7) == 8 and value_bytes("TIMESTAMP", "2026-01-01") == 8
    assert value_bytes("STRING", "héllo") == 2 + 6  # 2 + UTF-8 bytes
    assert value_bytes("BYTES", "AAEC") == 2 + 3  # base64 as the REST API returns it
    assert value_bytes("NUMERIC", "1.5") == 16 and value_bytes("BOOLEAN", True) == 1
    assert value_bytes("STRING", None) == 0


def _sizes() -> dict[str, TableSize]:
    return {"events": TableSize({"id": 40 * MB, "payload": 60 * MB}), "_ingest_markers": TableSize({"dedup_id": MB})}


def test_a_delete_bills_every_column_of_the_partition_it_deletes_from():
    sql = "DELETE FROM `p.ds.events` WHERE id IN UNNEST(@ids)"
    # q (the referenced `id`) + t (every column): 40 + 100 MB
    assert job_estimate(sql, "DELETE", "ds", _sizes()) == 140 * MB


def test_queries_bill_referenced_columns_at_least_10_mb_per_table_and_ddl_nothing():
    lookup = "SELECT dedup_id, state FROM `p.ds._ingest_markers` WHERE dedup_id IN UNNEST(@ids)"
    assert job_estimate(lookup, "SELECT", "ds", _sizes()) == MIN_BILLED_PER_TABLE
    assert job_estimate("SELECT payload FROM `p.ds.events`", "SELECT", "ds", _sizes()) == 60 * MB
    assert job_estimate("ALTER TABLE `p.ds.events` ADD COLUMN note STRING", "ALTER_TABLE", "ds", _sizes()) == 0
