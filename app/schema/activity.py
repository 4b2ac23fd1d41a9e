"""The activity: one row-level change, as the API accepts it and as messages carry it.

`Activity` is the validated, canonical form (values already normalized by the type
table in `app.schema.types`), so the subscriber never re-validates user input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Operation = Literal["insert", "delete", "upsert"]
OPERATIONS: tuple[str, ...] = ("insert", "delete", "upsert")

# The five keys every activity has, in the order clients send them.
ACTIVITY_FIELDS: tuple[str, ...] = ("operation", "table", "col_names", "col_types", "col_values")
# The sixth, which an upsert has and no other operation may have.
KEY_FIELD = "key"
# Key columns must compare exactly: not float (NaN, -0.0), record (JSON) or geography (WKT spellings).
KEY_TYPES: frozenset[str] = frozenset(
    {"string", "bytes", "integer", "numeric", "bignumeric", "boolean", "timestamp", "date", "time", "datetime"}
)


@dataclass(slots=True)
class Activity:
    operation: Operation
    table: str
    col_names: list[str]
    col_types: list[str]  # lower-case names from app.schema.types.TYPES
    col_values: list[Any]  # canonical values (see app.schema.types)
    key: list[str] | None = None  # an upsert's key columns (names as in col_names); None otherwise

    def to_dict(self) -> dict[str, Any]:
        body = {
            "operation": self.operation,
            "table": self.table,
            "col_names": self.col_names,
            "col_types": self.col_types,
            "col_values": self.col_values,
        }
        if self.key is not None:
            body[KEY_FIELD] = self.key
        return body
