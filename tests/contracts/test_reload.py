"""Hot reload: a change takes effect on the next call; a broken change keeps the last good version and says so."""

from __future__ import annotations

import logging

import pytest

from app.contracts.file import TablesFileInvalid
from app.contracts.reload import TablesFile


def test_no_file_means_no_contracts():
    tables = TablesFile(None)
    assert tables.current() is None
    assert tables.status() == {"file": None}


def test_an_invalid_file_is_refused_at_start(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'frozen'\n")
    with pytest.raises(TablesFileInvalid, match=r"tables.toml:2: unknown contract mode 'frozen'"):
        TablesFile(path)


def test_a_change_takes_effect_on_the_next_call(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'evolve'\n")
    tables = TablesFile(path)
    assert tables.current().defaults.contract.columns == "evolve"
    path.write_text("[defaults]\ncontract = 'discard_row'\n")  # another size: seen even within one mtime tick
    assert tables.current().defaults.contract.columns == "discard_row"
    assert tables.status() == {"file": str(path), "ok": True, "problem": None}


def test_a_broken_change_keeps_the_last_good_version_and_says_so(tmp_path, caplog):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'freeze'\n")
    tables = TablesFile(path)
    path.write_text("[defaults]\ncontract = 'freeze\n")
    with caplog.at_level(logging.WARNING, logger="app.contracts"):
        assert tables.current().defaults.contract.columns == "freeze"
    status = tables.status()
    assert status["ok"] is False and "tables.toml:2:" in status["problem"] and "keeping the version" in status["problem"]
    assert [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()] == [
        f"tables file not reloaded: {status['problem']}"
    ]  # once per change, not once per call
    path.write_text("[defaults]\ncontract = 'discard_value'\n")
    assert tables.current().defaults.contract.columns == "discard_value"
    assert tables.status()["ok"] is True


def test_a_removed_file_keeps_the_last_good_version(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'freeze'\n")
    tables = TablesFile(path)
    path.unlink()
    assert tables.current().defaults.contract.tables == "freeze"
    assert "the file is missing" in tables.status()["problem"]


def test_between_checks_the_file_is_not_looked_at_and_readyz_looks_now(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'evolve'\n")
    tables = TablesFile(path, check_seconds=3600)
    assert tables.current().defaults.contract.columns == "evolve"  # the first call looks, then not for an hour
    path.write_text("[defaults]\ncontract = 'freeze'\n")
    assert tables.current().defaults.contract.columns == "evolve"
    assert tables.status()["ok"] is True
    assert tables.current().defaults.contract.columns == "freeze"
