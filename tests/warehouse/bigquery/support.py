"""Helpers shared by the BigQuery tests."""

from __future__ import annotations

from app.warehouse.bigquery import BigQueryWarehouse


def ids(wh: BigQueryWarehouse, table: str) -> list[int]:
    _, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{table}`")
    return sorted(r[0] for r in rows)
