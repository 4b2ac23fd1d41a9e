"""The OpenAPI models of the ingest body: documentation of the contract, with its example.

The API never validates with them (`app.schema.validation` does, reporting every problem);
`app.api.app` publishes their JSON Schema in /openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schema.identifiers import IDENTIFIER_PATTERN, INTERNAL_PREFIX, MAX_COLUMN_NAME, MAX_TABLE_NAME
from app.schema.types import TYPE_NAMES

__all__ = ["ActivityIn", "IngestRequest", "EXAMPLE_ACTIVITY", "EXAMPLE_REQUEST"]

EXAMPLE_ACTIVITY: dict[str, Any] = {
    "operation": "insert",
    "table": "user_activities_table",
    "col_names": ["user_id", "event_type_id", "detail", "occured_at"],
    "col_types": ["integer", "integer", "string", "datetime"],
    "col_values": [1, 2, "logged in", "2021-03-30 06:12:44"],
}
EXAMPLE_REQUEST: dict[str, Any] = {"user_activities": [EXAMPLE_ACTIVITY]}


class ActivityIn(BaseModel):
    """One row-level change. Documents the contract; `app.schema.validation.validate_batch` enforces it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_ACTIVITY]})

    operation: Literal["insert", "delete", "upsert"] = Field(
        description="`insert` adds a row; `delete` removes the rows whose named columns all equal "
        "the given values; `upsert` replaces the row with the same `key` values (the whole row: "
        "columns not sent become null) or adds it. On a table that has a key (fixed by its first "
        "upsert) an `insert` is an upsert on that key. Any letter case is accepted.",
        examples=["insert"],
    )
    table: str = Field(
        min_length=1,
        max_length=MAX_TABLE_NAME,
        pattern=IDENTIFIER_PATTERN,
        description="Target table: ASCII letters, digits and underscores, not starting with a digit; "
        f"created on first insert. Names starting with `{INTERNAL_PREFIX}` are reserved.",
        examples=["user_activities_table"],
    )
    col_names: list[str] = Field(
        min_length=1,
        description=f"Column names (same rules as table names, at most {MAX_COLUMN_NAME} characters, unique "
        "case-insensitively; BigQuery's reserved prefixes such as `_TABLE_` are refused).",
        examples=[EXAMPLE_ACTIVITY["col_names"]],
    )
    col_types: list[str] = Field(
        min_length=1,
        description="One type per column, any letter case: " + ", ".join(f"`{t}`" for t in TYPE_NAMES) + ".",
        json_schema_extra={"items": {"type": "string", "enum": list(TYPE_NAMES)}},
        examples=[EXAMPLE_ACTIVITY["col_types"]],
    )
    col_values: list[Any] = Field(
        min_length=1,
        description="One value per column (null allowed for every type), in a form its type accepts: "
        "BigQuery's JSON-ingestion forms (see the per-type examples).",
        examples=[EXAMPLE_ACTIVITY["col_values"]],
    )

    key: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Upsert only (required there, refused on other operations): the distinct names, "
        "from `col_names`, of the columns that identify a row; their values must not be null, and "
        "their types compare exactly (not `float`, `record` or `geography`). The first upsert fixes "
        "the table's key; an upsert naming another key is refused (dead-lettered).",
        examples=[["user_id"]],
    )

    @field_validator("operation", mode="before")
    @classmethod
    def _lower_operation(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class IngestRequest(BaseModel):
    """The body of `POST /api-log/v1/`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    user_activities: list[ActivityIn] = Field(
        min_length=1, description="Activities, applied in order per table."
    )
