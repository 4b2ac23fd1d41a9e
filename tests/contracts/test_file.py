"""The tables file: sections, precedence, effective settings with their lines, refusals with line and reason."""

from __future__ import annotations

import pytest

from app.contracts.describe import describe
from app.contracts.file import Contract, TablesFileInvalid, parse

FILE = '''\
[defaults]
contract = "discard_value"
new_tables = "refuse"
description = "owned by data engineering"

[tables.orders]
columns = {id = "integer", email = "string"}
key = ["id"]
contract = {columns = "freeze"}
pii = {email = "hmac"}

[tables."audit_*"]
contract = "discard_row"

[tables."audit_login*"]
contract = "freeze"

[tables.audit_special]
contract = "evolve"
'''


def test_exact_beats_glob_and_longest_glob_wins():
    config = parse(FILE)
    assert config.settings_for("audit_special").section == "audit_special"
    assert config.settings_for("audit_login_eu").section == "audit_login*"
    assert config.settings_for("audit_logout").section == "audit_*"
    unmatched = config.settings_for("clicks")
    assert unmatched.section == "defaults" and not unmatched.declared


def test_a_table_inherits_the_defaults_per_entity_and_option():
    config = parse(FILE)
    orders = config.settings_for("orders")
    assert orders.contract == Contract(tables="discard_value", columns="freeze", types="discard_value")
    assert orders.options == {"description": "owned by data engineering"}
    assert orders.key == ("id",) and orders.pii == {"email": "hmac"}
    assert orders.lines == {"description": 4, "columns": 7, "key": 8, "contract": 9, "pii": 10}
    assert config.new_tables == "refuse"


def test_without_defaults_every_table_evolves_and_new_tables_are_allowed():
    config = parse("[tables.orders]\ncolumns = {id = 'integer'}\n")
    assert config.new_tables == "allow"
    assert config.settings_for("orders").contract == Contract("evolve", "evolve", "evolve")


def test_describe_lists_effective_settings_with_their_lines():
    text = "\n".join(describe(parse(FILE, "t.toml")))
    assert "new tables: refuse  (t.toml:3)" in text
    assert "[tables.orders]\n  contract: tables=discard_value, columns=freeze, types=discard_value  (t.toml:9)" in text
    assert "  description: owned by data engineering  (t.toml:4)" in text
    assert '[tables."audit_login*"] (glob)\n  contract: freeze  (t.toml:16)' in text


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[defaults]\ncontract = 'freez'\n", 2, "unknown contract mode 'freez'"),
        ("[defaults]\nnew_tables = 'maybe'\n", 2, "new_tables must be one of allow, refuse"),
        ("[tables.t]\ncolumns = {a = 'int'}\n", 2, "column 'a' has unknown type 'int'"),
        ("[tables.t]\ncolumnz = {a = 'integer'}\n", 2, "unknown setting 'columnz'"),
        ("[tables.t]\ncontract = {rows = 'freeze'}\n", 2, "unknown entity 'rows'"),
        ("[tables.t]\ncolumns = {a = 'integer'}\nkey = ['b']\n", 3, "key must be a list of declared columns"),
        ("[tables.t]\ncolumns = {a = 'integer'}\npii = {a = 'hmac'}\n", 3, "hmac needs column 'a' declared as string or bytes"),
        ("[tables.t]\npii = {a = 'shred'}\n", 2, "unknown pii policy 'shred'"),
        ("\n[tables._ingest_x]\n", 2, "reserved for the pipeline"),
        ("[tables.t]\nclustering = ['a', 'b', 'c', 'd', 'e']\n", 2, "clustering must be a list of 1 to 4 column names"),
        ("[tables.t]\npartition_expiration_days = -1\n", 2, "partition_expiration_days must be a positive number"),
        ("[other]\n", 1, "unknown section 'other'"),
        ("[tables.t]\ncolumns = {a = 'integer'\n", 2, "inline table"),
    ],
)
def test_an_invalid_file_is_refused_with_line_and_reason(text, line, reason):
    with pytest.raises(TablesFileInvalid) as caught:
        parse(text, "t.toml")
    assert caught.value.line == line
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"t.toml:{line}: ")
