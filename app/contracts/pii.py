"""PII policies, applied at the edge before anything is published (docs/contracts.md).

- `hmac`: HMAC-SHA256 under the first key of `PII_HMAC_KEYS` (`v2:secret,v1:old`),
  stored as `v2:<hex>`: deterministic, so joins on hashed columns still work. The
  message carries it as a `string` (a `bytes` column's hash too).
- `drop`: the column is removed from the activity.
- `redact`: each non-null value becomes `REDACTED`.

The policy follows the column name in every activity of the table, whatever type it
was sent with, so a raw value never reaches the broker, a quarantine row, a dead letter,
the warehouse, a log line or a metric.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from app.contracts.file import TablesConfig, TablesFileInvalid
from app.schema.activity import Activity
from app.schema.columnar import ActivityRun, record_batch

REDACTED = "[redacted]"
# A delete's conditions under these would match other rows (a marker) or more rows (none).
UNSAFE_IN_DELETES = frozenset({"drop", "redact"})


def delete_problem(config: TablesConfig, table: str, operation: str, names: list[str]) -> str | None:
    """Why a delete cannot go through its table's PII policies, or None."""
    if operation != "delete":
        return None
    pii = config.settings_for(table).pii
    unsafe = [n for n in names if pii.get(n) in UNSAFE_IN_DELETES]
    if not unsafe:
        return None
    return f"a delete cannot name column {unsafe[0]!r}: its pii policy is {pii[unsafe[0]]}, so the condition would not match the stored rows"


@dataclass(frozen=True, slots=True)
class HmacKey:
    version: str
    secret: bytes

    def digest(self, type_name: str, value: Any) -> str:
        if type_name == "bytes" and value.__class__ is str:
            data = binascii.a2b_base64(value)  # the bytes themselves, not their base64 text
        elif value.__class__ is str:
            data = value.encode("utf-8")
        else:
            data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        return f"{self.version}:{hmac.new(self.secret, data, hashlib.sha256).hexdigest()}"


def parse_hmac_keys(text: str | None) -> list[HmacKey]:
    """`v2:secret,v1:old` -> keys, newest (used) first; a malformed entry is refused."""
    keys: list[HmacKey] = []
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        version, sep, secret = entry.partition(":")
        if not sep or not version.strip() or not secret:
            raise ValueError("PII_HMAC_KEYS entries are VERSION:SECRET, e.g. v2:secret,v1:old")
        keys.append(HmacKey(version.strip(), secret.encode("utf-8")))
    return keys


def require_keys_for(config: TablesConfig, keys: list[HmacKey]) -> None:
    """Refuses a file that asks for `hmac` when no key is set."""
    if keys:
        return
    for settings in (*config.exact.values(), *(s for _, s in config.globs)):
        if "hmac" in settings.pii.values():
            raise TablesFileInvalid(config.path, settings.lines.get("pii", 0), "pii policy hmac needs PII_HMAC_KEYS")


class PiiPolicies:
    def __init__(self, keys: list[HmacKey]) -> None:
        self.key = keys[0] if keys else None

    def _value(self, policy: str, type_name: str, value: Any) -> Any:
        if value is None:
            return None
        if policy == "redact":
            return REDACTED
        assert self.key is not None  # require_keys_for refused the file otherwise
        return self.key.digest(type_name, value)

    def activity(self, config: TablesConfig, activity: Activity) -> Activity:
        pii = config.settings_for(activity.table).pii
        if not pii or pii.keys().isdisjoint(activity.col_names):
            return activity
        names, types, values = [], [], []
        for name, type_name, value in zip(activity.col_names, activity.col_types, activity.col_values):
            policy = pii.get(name)
            if policy == "drop":
                continue
            names.append(name)
            types.append(type_name if policy is None else "string")
            values.append(value if policy is None else self._value(policy, type_name, value))
        return Activity(activity.operation, activity.table, names, types, values)

    def run(self, config: TablesConfig, run: ActivityRun) -> ActivityRun:
        pii = config.settings_for(run.table).pii
        if not pii or pii.keys().isdisjoint(run.col_names):
            return run
        names, types, arrays = [], [], []
        canonical = None
        for position, (name, type_name) in enumerate(zip(run.col_names, run.col_types)):
            policy = pii.get(name)
            if policy == "drop":
                continue
            names.append(name)
            if policy is None:
                types.append(type_name)
                arrays.append(run.batch.column(position))
                continue
            canonical = canonical or run.column_values()
            types.append("string")
            arrays.append(pa.array([self._value(policy, type_name, v) for v in canonical[position]], pa.string()))
        return ActivityRun(run.table, run.operation, names, types, record_batch(types, arrays))
