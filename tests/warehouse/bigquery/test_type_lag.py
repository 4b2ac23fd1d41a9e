"""Columns widened lately: a refused append carrying one waits instead of dead-lettering."""

from __future__ import annotations

import pyarrow as pa

from app.warehouse.bigquery.type_lag import RecentWidenings
from tests.support.fault_proxy.storage_write import SchemaVisibility


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_widened_column_is_pending_for_the_lag_then_not():
    clock = Clock()
    recent = RecentWidenings(lag_seconds=600, clock=clock)
    recent.note("scores", ["score"])
    assert recent.pending("scores", ["id", "score"]) == ["score"]
    assert recent.pending("other", ["score"]) == []
    clock.now += 601
    assert recent.pending("scores", ["id", "score"]) == []


def test_the_fault_layer_refuses_only_the_new_type_while_the_stream_has_the_old_one():
    lag = SchemaVisibility(lag_seconds=3600)
    lag.type_changed("ds", "scores", "score", "INTEGER")
    assert lag.stale_types("ds", "scores", {"id": pa.int64(), "score": pa.float64()}) == {"score": "INTEGER"}
    assert lag.stale_types("ds", "scores", {"id": pa.int64(), "score": pa.int64()}) == {}
    numeric = SchemaVisibility(lag_seconds=3600)
    numeric.type_changed("ds", "prices", "amount", "NUMERIC")
    assert numeric.stale_types("ds", "prices", {"amount": pa.decimal128(38, 9)}) == {}
    assert numeric.stale_types("ds", "prices", {"amount": pa.float64()}) == {"amount": "NUMERIC"}
    assert SchemaVisibility(lag_seconds=0).stale_types("ds", "scores", {"score": pa.float64()}) == {}
