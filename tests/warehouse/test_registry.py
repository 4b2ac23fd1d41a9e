"""Backends by name: Settings accepts exactly the registered ones; nothing else picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.warehouse import make_warehouse, open_read_only, register
from app.warehouse.registry import registered, unregister
from app.warehouse.base import Warehouse


class _Named(Warehouse):
    """Enough of a warehouse to tell which opener made it."""

    def __init__(self, settings: Settings, how: str) -> None:
        self.settings, self.how = settings, how

    def apply(self, table, envelopes):  # pragma: no cover - never applied
        raise NotImplementedError

    def query(self, sql, params=None):  # pragma: no cover
        raise NotImplementedError

    def table_schema(self, table):  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
def scratch() -> Iterator[str]:
    name = "scratch_backend"
    yield name
    unregister(name)


def test_unknown_names_are_refused_naming_the_registered_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown warehouse 'sqlite'; registered: .*bigquery, duckdb"):
        Settings(warehouse="sqlite")
    assert {"duckdb", "bigquery"} <= set(registered())


def test_a_registered_backend_is_a_valid_setting_and_opens(scratch: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(warehouse=scratch)
    register(scratch, lambda s: _Named(s, "writer"))
    settings = Settings(warehouse=scratch, data_dir=tmp_path)
    opened = make_warehouse(settings)
    assert isinstance(opened, _Named) and (opened.how, opened.settings) == ("writer", settings)
    assert open_read_only(settings).how == "writer"  # no read-only opener: the normal one
    register(scratch, lambda s: _Named(s, "writer"), lambda s: _Named(s, "reader"))
    assert (make_warehouse(settings).how, open_read_only(settings).how) == ("writer", "reader")
