"""The key ring: constant-time lookup over every key, reloads on change, keeps the last good file."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from app.keys import ApiKey, KeyRing, new_key, write_keys_file
from app.keys.entries import digest_of, revoked
from app.keys.ring import CHECK_EVERY_SECONDS
from app.keys.usage import UsageLog, read_usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_revocation_and_rotation_take_effect_without_a_restart(tmp_path):
    path, clock = tmp_path / "keys.toml", Clock()
    old, old_secret = new_key("orders-1", ["*"], ["insert"])
    write_keys_file(path, [old])
    ring = KeyRing([], path, clock=clock)
    assert ring.authenticate(old_secret).id == "orders-1"

    new, new_secret = new_key("orders-2", ["*"], ["insert"])
    write_keys_file(path, [old, new])
    clock.now += CHECK_EVERY_SECONDS
    assert ring.authenticate(old_secret).id == "orders-1"  # during a rotation both are valid
    assert ring.authenticate(new_secret).id == "orders-2"

    write_keys_file(path, [revoked(old), new])
    assert CHECK_EVERY_SECONDS <= 5
    clock.now += CHECK_EVERY_SECONDS
    assert ring.authenticate(old_secret) is None
    assert ring.authenticate(new_secret).id == "orders-2"


def test_a_broken_file_keeps_the_last_good_keys(tmp_path, caplog):
    path, clock = tmp_path / "keys.toml", Clock()
    key, secret = new_key("k", ["*"], ["insert"])
    write_keys_file(path, [key])
    ring = KeyRing([], path, clock=clock)
    path.write_text("[[keys]\nbroken")
    clock.now += CHECK_EVERY_SECONDS
    assert ring.authenticate(secret).id == "k"
    assert "keys file not reloaded" in caplog.text


def test_env_keys_unknown_secrets_and_keys_off(tmp_path):
    env = [ApiKey(id="env-1", digest=digest_of("env-secret"), from_env=True)]
    ring = KeyRing(env)
    assert ring.enabled and ring.authenticate("nope") is None and ring.authenticate(None) is None
    assert ring.authenticate("env-secret").id == "env-1"
    assert not KeyRing([]).enabled
    write_keys_file(tmp_path / "keys.toml", [])
    empty_file = KeyRing([], tmp_path / "keys.toml")
    assert empty_file.enabled and empty_file.authenticate("anything") is None  # a file, even empty, means keys on


def test_last_use_is_saved_with_ids_only(tmp_path):
    clock = Clock()
    key, secret = new_key("k", ["*"], ["insert"])
    write_keys_file(tmp_path / "keys.toml", [key])
    usage = UsageLog(tmp_path / "usage.json")
    ring = KeyRing([], tmp_path / "keys.toml", usage, clock=clock, wall_clock=lambda: 1_700_000_000.0)
    ring.authenticate(secret)
    usage.save(clock())
    assert read_usage(tmp_path / "usage.json") == {"k": 1_700_000_000.0}
    text = (tmp_path / "usage.json").read_text()
    assert secret not in text and digest_of(secret).hex() not in text


def test_a_remembered_secret_still_expires_and_a_removed_key_is_forgotten(tmp_path):
    path, clock, wall = tmp_path / "keys.toml", Clock(), Clock()
    key, secret = new_key("k", ["*"], ["insert"], expires="2030-01-01T00:00:00Z")
    other, other_secret = new_key("other", ["*"], ["insert"])
    write_keys_file(path, [key, other])
    ring = KeyRing([], path, clock=clock, wall_clock=wall)
    wall.now = 1_800_000_000.0  # 2027
    assert ring.authenticate(secret).id == "k" and ring.authenticate(secret).id == "k"  # the second: remembered
    wall.now = 1_900_000_000.0  # 2030, past `expires`
    assert ring.authenticate(secret) is None
    assert ring.authenticate(other_secret).id == "other"
    write_keys_file(path, [key])  # `other` removed from the file, not just disabled
    clock.now += CHECK_EVERY_SECONDS
    assert ring.authenticate(other_secret) is None


def _bearer(secret: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {secret}".encode()}


def test_a_remembered_authorization_header_still_sees_revocation_and_a_narrowed_scope(tmp_path):
    path, clock = tmp_path / "keys.toml", Clock()
    key, secret = new_key("k", ["orders*"], ["insert"])
    write_keys_file(path, [key])
    ring = KeyRing([], path, clock=clock)
    for _ in range(2):  # the second time from the remembered header
        found = ring.authenticate_request(_bearer(secret))
        assert found.id == "k" and found.allows("orders_eu", "insert")
    assert ring.authenticate_request({b"x-api-key": secret.encode()}).id == "k"  # the other header
    assert ring.authenticate_request(_bearer("not-" + secret)) is None
    assert ring.authenticate_request({b"authorization": b"Basic " + secret.encode()}) is None
    other_scheme = {b"authorization": b"Basic dXNlcjpwYXNz"}  # not the header that held the key: not remembered
    assert ring.authenticate_request({**other_scheme, b"x-api-key": secret.encode()}).id == "k"
    assert ring.authenticate_request(other_scheme) is None

    narrowed, _ = new_key("k", ["orders"], ["insert"])
    write_keys_file(path, [replace(narrowed, digest=key.digest)])  # same secret, fewer tables
    clock.now += CHECK_EVERY_SECONDS
    found = ring.authenticate_request(_bearer(secret))
    assert found.allows("orders", "insert") and not found.allows("orders_eu", "insert")

    write_keys_file(path, [revoked(replace(narrowed, digest=key.digest))])
    clock.now += CHECK_EVERY_SECONDS
    assert ring.authenticate_request(_bearer(secret)) is None
    assert ring.authenticate_request({b"x-api-key": secret.encode()}) is None


def test_a_remembered_authorization_header_still_expires(tmp_path):
    path, wall = tmp_path / "keys.toml", Clock()
    key, secret = new_key("k", ["*"], ["insert"], expires=datetime(2030, 1, 1, tzinfo=timezone.utc))
    write_keys_file(path, [key])
    ring = KeyRing([], path, clock=Clock(), wall_clock=wall)
    wall.now = key.expires.timestamp() - 1
    assert ring.authenticate_request(_bearer(secret)).id == "k" and ring.authenticate_request(_bearer(secret)).id == "k"
    wall.now = key.expires.timestamp()
    assert ring.authenticate_request(_bearer(secret)) is None
