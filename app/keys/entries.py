"""One API key's entry and the TOML file that holds them (`API_KEYS_FILE`).

The file holds the SHA-256 of each secret, never the secret: a leaked file lets nobody
in. It is written whole to a temporary file and renamed over the old one, so the API,
which re-reads it on change, sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

from app.schema.activity import OPERATIONS

# Upsert is named by the issue that adds it; a key may already be scoped to it.
KNOWN_OPERATIONS: tuple[str, ...] = (*OPERATIONS, "upsert")
ENV_KEY_PREFIX = "env-"  # ids of the `API_KEYS` entries, by position: env-1, env-2, ...
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_TABLE_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!-]{1,1024}\Z")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_FIELDS = {"id", "sha256", "tables", "operations", "rate", "burst", "expires", "disabled"}
HEADER = "# API keys (`python -m app keys ...`): SHA-256 digests of the secrets, never the secrets.\n"


class KeysFileError(ValueError):
    """The keys file cannot be used as it is; the message says which entry and why."""


SCOPE_ANSWERS = 4096  # tables remembered per key: bounded, table names come from requests


@dataclass(frozen=True)
class ApiKey:
    """What one key may do. `tables` are names or globs (`orders*`); `rate` is activities per second.

    A key is never changed: a reload of the file makes new ones, so the answers a key
    remembers (`operations_in`) are forgotten with it.
    """

    id: str
    digest: bytes
    tables: tuple[str, ...] = ("*",)
    operations: frozenset[str] = frozenset(KNOWN_OPERATIONS)
    rate: float | None = None
    burst: float | None = None
    expires: datetime | None = None
    disabled: bool = False
    from_env: bool = False  # an `API_KEYS` key: every scope, no client identity
    # Unix time from which the key is refused: `disabled` and `expires` as one number, so
    # a request compares two floats instead of converting a datetime.
    usable_until: float = field(init=False, compare=False, repr=False)
    scope_answers: dict[str, frozenset[str]] = field(default_factory=dict, init=False, compare=False, repr=False)
    # Its request counts (`app.metrics.KeyTally`), kept by id across reloads; set by the key ring.
    tally: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        until = -math.inf if self.disabled else math.inf if self.expires is None else self.expires.timestamp()
        object.__setattr__(self, "usable_until", until)

    def usable(self, now: float) -> bool:
        return now < self.usable_until

    def allows(self, table: str, operation: str) -> bool:
        return operation in self.operations_in(table)

    def operations_in(self, table: str) -> frozenset[str]:
        """The operations this key may apply to `table` (remembered per table, up to SCOPE_ANSWERS)."""
        operations = self.scope_answers.get(table)
        if operations is None:
            operations = self.operations if any(fnmatchcase(table, p) for p in self.tables) else frozenset()
            if len(self.scope_answers) < SCOPE_ANSWERS:
                self.scope_answers[table] = operations
        return operations

    @property
    def capacity(self) -> float | None:
        """The bucket size of the rate limit: `burst`, else one second's worth."""
        return None if self.rate is None else (self.burst or self.rate)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def new_key(
    key_id: str,
    tables: list[str],
    operations: list[str],
    rate: float | None = None,
    burst: float | None = None,
    expires: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret (shown once: only its digest is kept)."""
    secret = "ak_" + secrets.token_urlsafe(32)
    raw = {"id": key_id, "sha256": digest_of(secret).hex(), "tables": tables, "operations": operations,
           "rate": rate, "burst": burst, "expires": expires}
    return _entry({k: v for k, v in raw.items() if v is not None}, 0), secret


def load_keys_file(path: Path) -> list[ApiKey]:
    """Every entry of the file, checked; raises KeysFileError naming the first bad one."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeysFileError(f"{path}: {exc}") from None
    raw_keys = data.get("keys", [])
    if not isinstance(raw_keys, list) or not all(isinstance(k, dict) for k in raw_keys):
        raise KeysFileError(f"{path}: `keys` must be an array of tables ([[keys]])")
    keys = [_entry(raw, i) for i, raw in enumerate(raw_keys)]
    seen: set[str] = set()
    for key in keys:
        if key.id in seen:
            raise KeysFileError(f"{path}: key id {key.id!r} appears twice")
        seen.add(key.id)
    return keys


def write_keys_file(path: Path, keys: list[ApiKey]) -> None:
    path = Path(path)
    text = HEADER + "".join(_toml_entry(k) for k in keys)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def revoked(key: ApiKey) -> ApiKey:
    return replace(key, disabled=True)  # a new key: its remembered answers start empty


def _entry(raw: dict[str, Any], index: int) -> ApiKey:
    where = f"keys[{index}]"
    unknown = set(raw) - _FIELDS
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    key_id = raw.get("id")
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise KeysFileError(f"{where}: `id` must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if key_id.startswith(ENV_KEY_PREFIX):
        raise KeysFileError(f"{where}: ids starting with {ENV_KEY_PREFIX!r} are the `API_KEYS` keys'")
    where = f"key {key_id!r}"
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
        raise KeysFileError(f"{where}: `sha256` must be 64 lower-case hex digits")
    tables = raw.get("tables", ["*"])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, str) and _TABLE_PATTERN.match(t) for t in tables):
        raise KeysFileError(f"{where}: `tables` must be a non-empty list of table names or globs")
    operations = raw.get("operations", list(KNOWN_OPERATIONS))
    if not isinstance(operations, list) or not operations or not set(operations) <= set(KNOWN_OPERATIONS):
        raise KeysFileError(f"{where}: `operations` must be a non-empty subset of {list(KNOWN_OPERATIONS)}")
    rate, burst = raw.get("rate"), raw.get("burst")
    for name, value in (("rate", rate), ("burst", burst)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise KeysFileError(f"{where}: `{name}` must be a positive number")
    if burst is not None and rate is None:
        raise KeysFileError(f"{where}: `burst` needs a `rate`")
    disabled = raw.get("disabled", False)
    if not isinstance(disabled, bool):
        raise KeysFileError(f"{where}: `disabled` must be true or false")
    return ApiKey(
        id=key_id, digest=bytes.fromhex(digest), tables=tuple(tables), operations=frozenset(operations),
        rate=None if rate is None else float(rate), burst=None if burst is None else float(burst),
        expires=_expiry(raw.get("expires"), where), disabled=disabled,
    )


def _expiry(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise KeysFileError(f"{where}: `expires` must be an RFC 3339 time") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise KeysFileError(f"{where}: `expires` must be an RFC 3339 time with an offset (e.g. 2027-01-31T00:00:00Z)")
    return value.astimezone(timezone.utc)


def _toml_entry(key: ApiKey) -> str:
    # Strings as JSON: TOML basic strings take the same escapes for what ids and globs may hold.
    lines = [
        "\n[[keys]]",
        f"id = {orjson.dumps(key.id).decode()}",
        f'sha256 = "{key.digest.hex()}"',
        f"tables = {orjson.dumps(list(key.tables)).decode()}",
        f"operations = {orjson.dumps(sorted(key.operations)).decode()}",
    ]
    if key.rate is not None:
        lines.append(f"rate = {key.rate!r}")
    if key.burst is not None:
        lines.append(f"burst = {key.burst!r}")
    if key.expires is not None:
        lines.append(f"expires = {key.expires.isoformat().replace('+00:00', 'Z')}")
    lines.append(f"disabled = {'true' if key.disabled else 'false'}")
    return "\n".join(lines) + "\n"
