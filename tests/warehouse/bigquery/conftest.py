"""BigQuery fixtures: one emulator per session (tests.support.bqemulator.shared_emulator), a
fresh dataset per test. The emulator failing to start fails these tests (no skip).
"""

from __future__ import annotations

from typing import Iterator

import pytest

from app.settings import Settings
from app.warehouse.bigquery import BigQueryWarehouse


@pytest.fixture(scope="module")
def emu():
    from tests.support.bqemulator import EmulatorUnavailable, shared_emulator

    try:
        return shared_emulator()
    except EmulatorUnavailable as exc:  # CI=true: fail loudly
        pytest.fail(str(exc))


@pytest.fixture
def settings(emu, tmp_path) -> Settings:
    return emu.settings(tmp_path, "bq_")


@pytest.fixture
def wh(settings) -> Iterator[BigQueryWarehouse]:
    from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES

    w = BigQueryWarehouse(settings, type_overrides=EMULATOR_TYPE_OVERRIDES)
    yield w
    w.close()


@pytest.fixture
def other_replica(settings, monkeypatch) -> Iterator[BigQueryWarehouse]:
    """A second warehouse on the same dataset, as another subscriber replica has. The
    process-wide per-table locks are per process: two replicas don't share them."""
    import threading

    from app.warehouse.bigquery import warehouse as bq_warehouse
    from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES

    monkeypatch.setattr(bq_warehouse, "_table_lock", lambda key: threading.Lock())
    w = BigQueryWarehouse(settings, type_overrides=EMULATOR_TYPE_OVERRIDES)
    yield w
    w.close()
