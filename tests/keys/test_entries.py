"""The keys file: entries are checked, written with digests only, and read back the same."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest

from app.keys import KeysFileError, load_keys_file, new_key, write_keys_file
from app.keys.entries import revoked

DIGEST = hashlib.sha256(b"s").hexdigest()


def _file(tmp_path, text: str):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_a_new_key_round_trips_and_only_its_digest_is_written(tmp_path):
    expires = datetime(2027, 1, 31, tzinfo=timezone.utc)
    key, secret = new_key("orders-backend", ["orders*", "refunds"], ["insert", "upsert"], 5000, 10000, expires)
    path = tmp_path / "keys.toml"
    write_keys_file(path, [key, revoked(new_key("old", ["*"], ["delete"])[0])])
    text = path.read_text()
    assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() in text
    [back, old] = load_keys_file(path)
    assert (back.id, back.tables, back.operations, back.rate, back.burst, back.expires, back.disabled) == (
        "orders-backend", ("orders*", "refunds"), frozenset({"insert", "upsert"}), 5000.0, 10000.0, expires, False
    )
    assert back.digest == key.digest and old.disabled


@pytest.mark.parametrize(
    "table, operation, allowed",
    [("orders", "insert", True), ("orders_2026", "upsert", True), ("orders", "delete", False),
     ("refunds", "insert", True), ("refunds_x", "insert", False), ("users", "insert", False)],
)
def test_scope_by_table_glob_and_operation(table, operation, allowed):
    key, _ = new_key("k", ["orders*", "refunds"], ["insert", "upsert"])
    assert key.allows(table, operation) is allowed


def test_expiry_and_disabled_make_a_key_unusable():
    key, _ = new_key("k", ["*"], ["insert"], expires=datetime(2027, 1, 1, tzinfo=timezone.utc))
    deadline = key.expires.timestamp()
    assert key.usable(deadline - 1) and not key.usable(deadline)
    assert not revoked(key).usable(deadline - 1)


def test_expires_may_be_a_toml_datetime_or_an_rfc3339_string(tmp_path):
    path = _file(tmp_path, f'[[keys]]\nid = "a"\nsha256 = "{DIGEST}"\nexpires = 2027-01-01T00:00:00+01:00\n'
                           f'[[keys]]\nid = "b"\nsha256 = "{DIGEST}"\nexpires = "2027-01-01T00:00:00Z"\n')
    a, b = load_keys_file(path)
    assert a.expires == datetime(2026, 12, 31, 23, tzinfo=timezone.utc)
    assert b.expires == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert a.tables == ("*",) and "delete" in a.operations  # unscoped fields mean every scope


@pytest.mark.parametrize(
    "entry, problem",
    [
        ('id = "a b"', "`id`"),
        (f'id = "env-1"\nsha256 = "{DIGEST}"', "API_KEYS"),
        ('id = "a"\nsha256 = "xyz"', "`sha256`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\noperations = ["drop"]', "`operations`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\ntables = []', "`tables`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\ntables = ["a;b"]', "`tables`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\nrate = -1', "`rate`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\nburst = 5', "`burst` needs a `rate`"),
        (f'id = "a"\nsha256 = "{DIGEST}"\nexpires = 2027-01-01T00:00:00', "offset"),
        (f'id = "a"\nsha256 = "{DIGEST}"\nsecret = "s"', "unknown field"),
        (f'id = "a"\nsha256 = "{DIGEST}"\n[[keys]]\nid = "a"\nsha256 = "{DIGEST}"', "appears twice"),
    ],
)
def test_a_bad_entry_is_refused_with_why(tmp_path, entry, problem):
    with pytest.raises(KeysFileError, match=problem):
        load_keys_file(_file(tmp_path, "[[keys]]\n" + entry + "\n"))
