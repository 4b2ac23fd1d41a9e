"""The activity: one row-level change, as the API accepts it and as messages carry it.

`Activity` is the validated, canonical form (values already normalized by the type
table in `app.schema.types`), so the subscriber never re-validates user input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Operation = Literal["insert", "delete"]
OPERATIONS: tuple[str, ...] = ("insert", "delete")

# The five keys of an activity, in the order clients send them.
ACTIVITY_FIELDS: tuple[str, ...] = ("operation", "table", "col_names", "col_types", "col_values")


@dataclass(slots=True)
class Activity:
    operation: Operation
    table: str
    col_names: list[str]
    col_types: list[str]  # lower-case names from app.schema.types.TYPES
    col_values: list[Any]  # canonical values (see app.schema.types)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "table": self.table,
            "col_names": self.col_names,
            "col_types": self.col_types,
            "col_values": self.col_values,
        }
