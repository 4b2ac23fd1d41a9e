"""The API and the tables file: refused at start when invalid; /readyz shows a refused change."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.contracts.file import TablesFileInvalid
from app.settings import Settings


def test_an_invalid_tables_file_stops_the_app_at_start(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[tables.orders]\ncontract = 'sometimes'\n")
    with pytest.raises(TablesFileInvalid, match="tables.toml:2: unknown contract mode 'sometimes'"):
        create_app(Settings(data_dir=tmp_path, tables_file=path))


def test_readyz_shows_a_refused_change_and_stays_ready(tmp_path):
    path = tmp_path / "tables.toml"
    path.write_text("[defaults]\ncontract = 'freeze'\n")
    with TestClient(create_app(Settings(data_dir=tmp_path, tables_file=path))) as client:
        assert client.get("/readyz").json()["tables_file"] == {"file": str(path), "ok": True, "problem": None}
        path.write_text("[defaults]\ncontract = 'freeze\n")
        answer = client.get("/readyz")
        assert answer.status_code == 200
        detail = answer.json()["tables_file"]
        assert detail["ok"] is False and "tables.toml:2:" in detail["problem"] and "keeping the version" in detail["problem"]


def test_readyz_without_a_tables_file_is_unchanged(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        assert "tables_file" not in client.get("/readyz").json()
