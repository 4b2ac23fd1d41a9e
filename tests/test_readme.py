"""The README's configuration table and quick start stay true to the code."""

from __future__ import annotations

import json
import re

from app.schema.types import TYPES
from app.schema.validation import validate_batch
from app.settings import Settings
from app.warehouse.bigquery.types import TypeMapper as BigQueryTypes
from app.warehouse.duckdb import TYPE_MAPPER as DUCKDB_TYPES
from tests.support.processes import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", README, flags=re.M))
    expected = {name.upper() for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the README table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_type_mapping_table_matches_code():
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| `([^`]+)` \|", README, flags=re.M)
    table = {name: (duck, bq) for name, duck, bq in rows if name in TYPES}
    assert set(table) == set(TYPES)
    bigquery_types = BigQueryTypes(emulator=False)
    for name in TYPES:
        assert table[name][0].startswith(DUCKDB_TYPES.column_type(name)), name
        assert table[name][1] == bigquery_types.column_type(name), name


def test_readme_example_body_is_valid():
    body = json.loads((ROOT / "examples" / "readme.json").read_text())
    assert len(validate_batch(body, max_activities=10)) == 2
    assert "make run" in README and "make test" in README
