"""Helpers shared by the BigQuery tests."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from app.settings import Settings
from app.warehouse.base import Envelope
from app.warehouse.bigquery import BigQueryWarehouse


def ids(wh: BigQueryWarehouse, table: str) -> list[int]:
    _, rows = wh.query(f"SELECT id FROM `{wh.dataset}.{table}`")
    return sorted(r[0] for r in rows)


def pause_before_first_dml(wh: BigQueryWarehouse, meanwhile: Callable[[], object]) -> None:
    """`wh`'s next DML job reaches BigQuery only after `meanwhile` ran: a replica paused
    (or its job queued) between its claim and its DML, while another replica went on."""
    real = wh.queries.dml
    ran: list[bool] = []

    def late(sql: str, params: list, job_id: str, what: str) -> int:
        if not ran:
            ran.append(True)
            meanwhile()
        return real(sql, params, job_id, what)

    wh.queries.dml = late  # type: ignore[method-assign]


def crash_before_done(settings: Settings, table: str, setup: Envelope, crashing: Envelope) -> None:
    """A process that applies `setup`, then dies applying `crashing` after writing its
    data but before its `done` markers."""
    first = BigQueryWarehouse(settings)
    try:
        first.apply(table, [setup])
        real = first._write_markers

        def crash_before_completion(markers: Any, per_table: list, state: str) -> Any:
            if state == "done":
                raise SystemExit("crash")
            return real(markers, per_table, state)

        first._write_markers = crash_before_completion  # type: ignore[method-assign]
        with pytest.raises(SystemExit):
            first.apply(table, [crashing])
    finally:
        first.close()
