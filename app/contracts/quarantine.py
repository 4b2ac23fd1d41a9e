"""The quarantine table's rows: one insert per activity a contract quarantined.

They travel like any activity (same message, same exactly-once apply) to the table
`_ingest_quarantine`, so data engineers query them like any table.
"""

from __future__ import annotations

import time

from app.contracts.check import Violation
from app.schema.activity import Activity
from app.schema.identifiers import QUARANTINE_TABLE

QUARANTINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("table_name", "string"),
    ("rule", "string"),
    ("reason", "string"),
    ("column_name", "string"),
    ("activity_index", "integer"),
    ("batch_id", "string"),
    ("received_at", "timestamp"),
    ("activity", "record"),
)
_NAMES = [name for name, _ in QUARANTINE_COLUMNS]
_TYPES = [type_name for _, type_name in QUARANTINE_COLUMNS]


def received_at_now() -> str:
    """Now, in the canonical timestamp form."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1_000_000):06d}Z"


KEY_ID_COLUMN = "key_id"  # the API key that sent it (never the secret), when keys are on


def quarantine_row(
    activity: Activity, index: int, violation: Violation, batch_id: str, received_at: str, key_id: str | None = None,
) -> Activity:
    values = [
        activity.table, violation.rule, violation.reason, violation.column, index, batch_id, received_at, activity.to_dict(),
    ]
    if key_id is None:
        return Activity("insert", QUARANTINE_TABLE, list(_NAMES), list(_TYPES), values)
    return Activity("insert", QUARANTINE_TABLE, [*_NAMES, KEY_ID_COLUMN], [*_TYPES, "string"], [*values, key_id])
