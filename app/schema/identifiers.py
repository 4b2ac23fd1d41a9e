"""BigQuery identifier rules for table and column names, checked at the API edge.

Both kinds of name: ASCII letters, digits and underscores only, not starting with a
digit, not empty. Table names at most 1024 characters, column names at most 300.
Column names must not start with BigQuery's reserved prefixes (`_TABLE_`, `_FILE_`,
`_PARTITION`, `_ROW_TIMESTAMP`, `__ROOT__`, `_COLIDENTIFIER`, and the change-data-capture
pseudo-columns `_CHANGE_SEQUENCE_NUMBER`, `_CHANGE_TYPE`, `_CHANGE_TIMESTAMP`; any letter
case), listed under "Column names" in
https://cloud.google.com/bigquery/docs/schemas#column_names. Neither
kind may start with `_ingest_` (any case): the pipeline keeps its own bookkeeping
tables and columns under that prefix.

Non-ASCII characters are refused with their code point named, so a Cyrillic "е" in
"usеr_id" is reported rather than silently creating a second look-alike column.

`check_table_name` / `check_column_name` return an error message or None; results for
valid names are cached (names repeat across requests), so calling them per activity
is cheap.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

MAX_TABLE_NAME = 1024
MAX_COLUMN_NAME = 300

RESERVED_COLUMN_PREFIXES: tuple[str, ...] = (
    "_table_",
    "_file_",
    "_partition",
    "_row_timestamp",
    "__root__",
    "_colidentifier",
    "_change_sequence_number",
    "_change_type",
    "_change_timestamp",
)
INTERNAL_PREFIX = "_ingest_"
# The one pipeline table clients' activities land in: those a contract quarantined
# (docs/contracts.md); the API writes it, clients cannot name it.
QUARANTINE_TABLE = INTERNAL_PREFIX + "quarantine"

# The one spelling of the rule: the JSON Schema `pattern` of the OpenAPI models, and the
# shape of every name the pipeline puts into SQL (backends quote only names matching it).
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
IDENTIFIER = re.compile(IDENTIFIER_PATTERN[1:-1] + r"\Z")  # \Z: `$` would admit a final newline
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_]")


def _describe_char(ch: str) -> str:
    name = unicodedata.name(ch, "")
    code = f"U+{ord(ch):04X}"
    if ch.isprintable() and not ch.isspace():
        return f"{ch!r} ({code}{' ' + name if name else ''})"
    return f"{code}{' ' + name if name else ''}"


def _shown(name: str) -> str:
    return repr(name if len(name) <= 50 else name[:50] + "...")


def _check(name: Any, kind: str, max_len: int) -> str | None:
    if type(name) is not str:
        return f"{kind} name must be a string"
    if not name:
        return f"{kind} name must not be empty"
    if len(name) > max_len:
        return f"{kind} name is {len(name)} characters long; at most {max_len} are allowed"
    if IDENTIFIER.match(name) is None:
        bad = _BAD_CHAR.search(name)
        if bad is not None:
            ch = bad.group()
            if not ch.isascii():
                return (
                    f"{kind} name {_shown(name)} contains the non-ASCII character {_describe_char(ch)}; "
                    "only ASCII letters, digits and underscores are allowed"
                )
            return (
                f"{kind} name {_shown(name)} contains {_describe_char(ch)}; "
                "only letters, digits and underscores are allowed"
            )
        return f"{kind} name {_shown(name)} starts with a digit; it must start with a letter or underscore"
    if is_internal(name):
        return f"{kind} name {_shown(name)} starts with '{INTERNAL_PREFIX}', which is reserved for the pipeline"
    return None


@lru_cache(maxsize=8192)
def _check_table_cached(name: str) -> str | None:
    return _check(name, "table", MAX_TABLE_NAME)


@lru_cache(maxsize=8192)
def _check_column_cached(name: str) -> str | None:
    error = _check(name, "column", MAX_COLUMN_NAME)
    if error is not None:
        return error
    low = name.lower()
    for prefix in RESERVED_COLUMN_PREFIXES:
        if low.startswith(prefix):
            return f"column name {_shown(name)} starts with the reserved prefix '{prefix.upper()}' (reserved by BigQuery)"
    return None


def is_internal(name: str) -> bool:
    """A name under the pipeline's own prefix (any letter case)."""
    return name[: len(INTERNAL_PREFIX)].lower() == INTERNAL_PREFIX


def takes_no_activities(table: str) -> bool:
    """A pipeline table no activity is applied to: internal, but not the quarantine table."""
    return is_internal(table) and table != QUARANTINE_TABLE


def check_applied_table_name(name: Any) -> str | None:
    """`check_table_name` for warehouses: the quarantine table is written like a client's table."""
    return None if name == QUARANTINE_TABLE else check_table_name(name)


def check_table_name(name: Any) -> str | None:
    """None when `name` is a usable table name, else a message saying what is wrong."""
    if type(name) is not str:
        return "table name must be a string"
    if len(name) > MAX_TABLE_NAME:  # don't fill the cache with huge strings
        return _check(name, "table", MAX_TABLE_NAME)
    return _check_table_cached(name)


def check_column_name(name: Any) -> str | None:
    """None when `name` is a usable column name, else a message saying what is wrong."""
    if type(name) is not str:
        return "column name must be a string"
    if len(name) > MAX_COLUMN_NAME:
        return _check(name, "column", MAX_COLUMN_NAME)
    return _check_column_cached(name)
