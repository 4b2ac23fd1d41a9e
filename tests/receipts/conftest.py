"""The receipts contract suite runs against every store: the local SQLite file, and
BigQuery's `_ingest_receipts` on bqemulator (a dataset per test; the emulator failing to
start fails these tests when CI=true)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from app.receipts.base import ReceiptStore

RETENTION_DAYS = 1.0


def _sqlite(tmp_path: Path) -> ReceiptStore:
    from app.receipts.sqlite import SqliteReceiptStore

    return SqliteReceiptStore(tmp_path / "receipts.sqlite", RETENTION_DAYS * 86400)


def _bigquery(tmp_path: Path) -> ReceiptStore:
    from app.warehouse.registry import open_receipts
    from tests.support.bqemulator import shared_emulator

    emu = shared_emulator()  # skips when it can't start, and fails instead when CI=true
    return open_receipts(emu.settings(tmp_path, "rc_", receipt_retention_days=RETENTION_DAYS))


STORES: dict[str, Callable[[Path], ReceiptStore]] = {
    "sqlite": _sqlite,
    "bigquery": _bigquery,
}


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("bigquery", marks=pytest.mark.emulator)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReceiptStore]:
    s = STORES[request.param](tmp_path)
    try:
        yield s
    finally:
        s.close()
