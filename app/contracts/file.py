"""The tables file: TOML parsed into `TablesConfig`, every mistake refused with its line.

Sections: `[defaults]`, `[tables.NAME]` and glob sections such as `[tables."audit_*"]`.
A table's effective settings are its section's, then the defaults'. An exact name beats
a glob; among globs the longest pattern wins (the first in the file on a tie).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Mapping

from app.schema.identifiers import check_column_name, check_table_name
from app.schema.types import TYPES

MODES: tuple[str, ...] = ("evolve", "freeze", "discard_row", "discard_value")
ENTITIES: tuple[str, ...] = ("tables", "columns", "types")
PII_POLICIES: tuple[str, ...] = ("hmac", "drop", "redact")
HMAC_TYPES: frozenset[str] = frozenset({"string", "bytes"})
NEW_TABLES: tuple[str, ...] = ("allow", "refuse")
OPTIONS: tuple[str, ...] = (
    "partition_expiration_days", "clustering", "require_partition_filter", "labels", "description",
)
TABLE_FIELDS: frozenset[str] = frozenset({"columns", "key", "contract", "pii", *OPTIONS})
DEFAULT_FIELDS: frozenset[str] = frozenset({"contract", "new_tables", *OPTIONS})
GLOB_CHARS = re.compile(r"[*?\[]")
GLOB_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[\]!-]{1,1024}$")
MAX_CLUSTERING = 4  # BigQuery's limit


class TablesFileInvalid(ValueError):
    """The file cannot be used; `line` is 0 when the reason is not about one line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True, slots=True)
class Contract:
    tables: str = "evolve"
    columns: str = "evolve"
    types: str = "evolve"

    def describe(self) -> str:
        if self.tables == self.columns == self.types:
            return self.tables
        return f"tables={self.tables}, columns={self.columns}, types={self.types}"


@dataclass(frozen=True, slots=True)
class TableSettings:
    """One table's effective settings; `lines` says which file line each field comes from."""

    section: str  # the section that matched: a name, a glob, or "defaults"
    declared: bool  # a [tables.*] section matched
    columns: Mapping[str, str]
    key: tuple[str, ...]
    contract: Contract
    pii: Mapping[str, str]
    options: Mapping[str, Any]
    lines: Mapping[str, int]


@dataclass(slots=True)
class TablesConfig:
    path: str
    new_tables: str
    defaults: TableSettings
    exact: dict[str, TableSettings]
    globs: list[tuple[str, TableSettings]]  # longest pattern first
    new_tables_line: int = 0
    _resolved: dict[str, TableSettings] = field(default_factory=dict, repr=False)
    verdicts: dict[tuple, object] = field(default_factory=dict, repr=False)  # app.contracts.check's memo
    has_pii: bool = False  # any table with a pii policy: else the edge skips that pass

    def settings_for(self, table: str) -> TableSettings:
        """The table's effective settings (memoized: the config never changes once built)."""
        found = self._resolved.get(table)
        if found is None:
            found = self.exact.get(table) or next(
                (s for pattern, s in self.globs if fnmatchcase(table, pattern)), self.defaults
            )
            if len(self._resolved) < 100_000:  # table names come from clients: bound the memo
                self._resolved[table] = found
        return found


# --- where things are in the text -------------------------------------------------------

_KEY = re.compile(r'^\s*(?:"([^"]*)"|([A-Za-z0-9_-]+))\s*[=.]')


def _header_path(line: str) -> tuple[str, ...] | None:
    stripped = line.strip()
    if not stripped.startswith("[") or stripped.startswith("[["):
        return None
    try:
        node: Any = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        (name, node), = node.items()
        path.append(name)
    return tuple(path)


def _lines_of(text: str) -> dict[tuple[str, ...], int]:
    """(section..., key) and (section...) -> the line they are written on."""
    where: dict[tuple[str, ...], int] = {}
    section: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _header_path(line)
        if header is not None:
            section = header
            where.setdefault(section, number)
            continue
        match = _KEY.match(line)
        if match:
            where.setdefault((*section, match.group(1) if match.group(1) is not None else match.group(2)), number)
    return where


# --- parsing ----------------------------------------------------------------------------


class _Parser:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.where = _lines_of(text)

    def line(self, *path: str) -> int:
        # The most precise place known: the key's own line, else its section's.
        for end in range(len(path), 0, -1):
            if path[:end] in self.where:
                return self.where[path[:end]]
        return 0

    def fail(self, path: tuple[str, ...], reason: str) -> TablesFileInvalid:
        return TablesFileInvalid(self.path, self.line(*path), reason)

    def contract(self, value: Any, at: tuple[str, ...], base: Contract) -> Contract:
        if isinstance(value, str):
            self.mode(value, at)
            return Contract(value, value, value)
        if not isinstance(value, dict):
            raise self.fail(at, f"contract must be a mode ({', '.join(MODES)}) or a table of {', '.join(ENTITIES)}")
        unknown = sorted(set(value) - set(ENTITIES))
        if unknown:
            raise self.fail(at, f"contract has unknown entity {unknown[0]!r}; entities are {', '.join(ENTITIES)}")
        for entity, mode in value.items():
            self.mode(mode, at)
        return Contract(**{e: value.get(e, getattr(base, e)) for e in ENTITIES})

    def mode(self, mode: Any, at: tuple[str, ...]) -> None:
        if mode not in MODES:
            raise self.fail(at, f"unknown contract mode {mode!r}; modes are {', '.join(MODES)}")

    def options(self, section: dict[str, Any], at: tuple[str, ...]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in OPTIONS:
            if name not in section:
                continue
            value, here = section[name], (*at, name)
            ok = {
                "partition_expiration_days": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                "clustering": isinstance(value, list) and 0 < len(value) <= MAX_CLUSTERING
                and all(isinstance(c, str) and check_column_name(c) is None for c in value),
                "require_partition_filter": isinstance(value, bool),
                "labels": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
                "description": isinstance(value, str),
            }[name]
            if not ok:
                raise self.fail(here, {
                    "partition_expiration_days": "partition_expiration_days must be a positive number",
                    "clustering": f"clustering must be a list of 1 to {MAX_CLUSTERING} column names",
                    "require_partition_filter": "require_partition_filter must be true or false",
                    "labels": "labels must be a table of strings",
                    "description": "description must be a string",
                }[name])
            found[name] = value
        return found

    def defaults(self, raw: Any) -> tuple[TableSettings, str, int]:
        at = ("defaults",)
        if not isinstance(raw, dict):
            raise self.fail(at, "defaults must be a table")
        self.known(raw, DEFAULT_FIELDS, at)
        new_tables = raw.get("new_tables", "allow")
        if new_tables not in NEW_TABLES:
            raise self.fail((*at, "new_tables"), f"new_tables must be one of {', '.join(NEW_TABLES)}")
        contract = self.contract(raw.get("contract", "evolve"), (*at, "contract"), Contract())
        lines = {name: self.line(*at, name) for name in raw}
        settings = TableSettings("defaults", False, {}, (), contract, {}, self.options(raw, at), lines)
        return settings, new_tables, self.line(*at, "new_tables") if "new_tables" in raw else 0

    def known(self, raw: dict[str, Any], allowed: frozenset[str], at: tuple[str, ...]) -> None:
        for name in raw:
            if name not in allowed:
                raise self.fail((*at, name), f"unknown setting {name!r}; known: {', '.join(sorted(allowed))}")

    def table(self, name: str, raw: Any, defaults: TableSettings) -> TableSettings:
        at = ("tables", name)
        if not isinstance(raw, dict):
            raise self.fail(at, f"tables.{name} must be a table")
        if GLOB_CHARS.search(name):
            if not GLOB_PATTERN.match(name):
                raise self.fail(at, f"glob {name!r} may only hold table-name characters and * ? [ ] !")
        elif (problem := check_table_name(name)) is not None:
            raise self.fail(at, problem)
        self.known(raw, TABLE_FIELDS, at)
        columns = raw.get("columns", {})
        if not isinstance(columns, dict):
            raise self.fail((*at, "columns"), 'columns must be a table such as {user_id = "integer"}')
        for column, type_name in columns.items():
            if (problem := check_column_name(column)) is not None:
                raise self.fail((*at, "columns"), problem)
            if type_name not in TYPES:
                raise self.fail((*at, "columns"), f"column {column!r} has unknown type {type_name!r}; types are {', '.join(TYPES)}")
        key = raw.get("key", [])
        if not isinstance(key, list) or not all(isinstance(k, str) and k in columns for k in key):
            raise self.fail((*at, "key"), "key must be a list of declared columns")
        pii = raw.get("pii", {})
        if not isinstance(pii, dict):
            raise self.fail((*at, "pii"), 'pii must be a table such as {email = "hmac"}')
        for column, policy in pii.items():
            if policy not in PII_POLICIES:
                raise self.fail((*at, "pii"), f"column {column!r} has unknown pii policy {policy!r}; policies are {', '.join(PII_POLICIES)}")
            if policy == "hmac" and columns.get(column) not in HMAC_TYPES:
                raise self.fail((*at, "pii"), f"hmac needs column {column!r} declared as string or bytes")
        contract = self.contract(raw["contract"], (*at, "contract"), defaults.contract) if "contract" in raw else defaults.contract
        inherited = {n: v for n, v in defaults.lines.items() if n in TABLE_FIELDS and n not in raw}
        lines = {**inherited, **{n: self.line(*at, n) for n in raw}}
        options = {**defaults.options, **self.options(raw, at)}
        return TableSettings(name, True, dict(columns), tuple(key), contract, dict(pii), options, lines)


def parse(text: str, path: str = "<tables file>") -> TablesConfig:
    """The config of a tables file's text; raises `TablesFileInvalid` with the line and reason."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(found.group(1)) if found else len(text.splitlines())  # else: "at end of document"
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc)) or "not valid TOML"
        raise TablesFileInvalid(path, line, reason) from None
    parser = _Parser(path, text)
    for name in raw:
        if name not in ("defaults", "tables"):
            raise parser.fail((name,), f"unknown section {name!r}; sections are [defaults] and [tables.NAME]")
    defaults, new_tables, new_tables_line = parser.defaults(raw.get("defaults", {}))
    tables = raw.get("tables", {})
    if not isinstance(tables, dict):
        raise parser.fail(("tables",), "tables must hold one section per table, such as [tables.orders]")
    exact: dict[str, TableSettings] = {}
    globs: list[tuple[str, TableSettings]] = []
    for name, section in tables.items():
        settings = parser.table(name, section, defaults)
        if GLOB_CHARS.search(name):
            globs.append((name, settings))
        else:
            exact[name] = settings
    globs.sort(key=lambda item: -len(item[0]))  # stable: the first in the file wins a tie
    has_pii = any(s.pii for s in exact.values()) or any(s.pii for _, s in globs)
    return TablesConfig(path, new_tables, defaults, exact, globs, new_tables_line, has_pii=has_pii)


def load(path: Path) -> TablesConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TablesFileInvalid(str(path), 0, f"cannot be read: {exc}") from None
    return parse(text, str(path))
