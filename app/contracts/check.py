"""What a table's contract does with one activity shape: keep, refuse, quarantine or trim.

The verdict depends only on (table, operation, column names, column types), never on
values, so it is decided once per shape and memoized on the config: a request of many
activities of one shape costs one dictionary lookup per activity (one per run for
columnar requests).

Modes per entity (docs/contracts.md):
- an undeclared table matters only under `new_tables = "refuse"`; the defaults'
  `tables` mode says what happens (`evolve` there reads as `freeze`; `discard_value`
  as `discard_row`: the activity is the value);
- an undeclared column of a declared table: the table's `columns` mode;
- a declared column sent with another type: the table's `types` mode (`evolve` keeps
  the declared type, so it reads as `freeze`).
A delete is never trimmed (dropping a condition column would delete more rows):
`discard_value` quarantines it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from app.contracts.file import TablesConfig

KEEP, REFUSE, QUARANTINE, TRIM = "keep", "refuse", "quarantine", "trim"
MAX_MEMOIZED_SHAPES = 10_000


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str  # the entity: "tables", "columns" or "types"
    mode: str  # the mode that applies: freeze, discard_row or discard_value
    column: str | None
    position: int | None  # index in col_names, None for the table
    reason: str

    def describe(self, where: str) -> str:
        return f"{self.reason} (contract {self.rule} = {self.mode}, {where})"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # KEEP, REFUSE, QUARANTINE or TRIM
    violations: tuple[Violation, ...] = ()  # the ones that decided the action
    keep: tuple[int, ...] = ()  # for TRIM: the column positions that stay
    where: str = ""  # the section that decided, with its line, for messages


KEEP_VERDICT = Verdict(KEEP)


def verdict(config: TablesConfig, table: str, operation: str, names: Sequence[str], types: Sequence[str]) -> Verdict:
    """The memoized verdict for one activity shape."""
    key = (table, operation, tuple(names), tuple(types))
    memo = config.verdicts
    found = memo.get(key)
    if found is None:
        found = _decide(config, table, operation, key[2], key[3])
        if len(memo) >= MAX_MEMOIZED_SHAPES:  # shapes come from clients: bound the memo
            memo.clear()
        memo[key] = found
    return found


def _decide(config: TablesConfig, table: str, operation: str, names: tuple[str, ...], types: tuple[str, ...]) -> Verdict:
    settings = config.settings_for(table)
    if not settings.declared:
        if config.new_tables == "allow":
            return KEEP_VERDICT
        mode = {"evolve": "freeze", "discard_value": "discard_row"}.get(settings.contract.tables, settings.contract.tables)
        where = f"new_tables = refuse, {config.path}:{config.new_tables_line}"
        violation = Violation("tables", mode, None, None, f"table {table!r} is not declared in the tables file")
        return Verdict(REFUSE if mode == "freeze" else QUARANTINE, (violation,), where=where)
    columns, contract = settings.columns, settings.contract
    violations: list[Violation] = []
    for position, (name, type_name) in enumerate(zip(names, types)):
        declared = columns.get(name)
        if declared is None:
            if contract.columns != "evolve":
                reason = f"column {name!r} is not declared for table {table!r}"
                violations.append(Violation("columns", contract.columns, name, position, reason))
        elif declared != type_name:
            mode = "freeze" if contract.types == "evolve" else contract.types
            reason = f"column {name!r} of table {table!r} is declared {declared}, sent as {type_name}"
            violations.append(Violation("types", mode, name, position, reason))
    if not violations:
        return KEEP_VERDICT
    line = settings.lines.get("contract") or settings.lines.get("columns")
    where = f"[tables.{settings.section}]" + (f", {config.path}:{line}" if line else "")
    by_mode = {mode: tuple(v for v in violations if v.mode == mode) for mode in ("freeze", "discard_row", "discard_value")}
    if by_mode["freeze"]:
        return Verdict(REFUSE, by_mode["freeze"], where=where)
    if by_mode["discard_row"]:
        return Verdict(QUARANTINE, by_mode["discard_row"][:1], where=where)
    dropped = {v.position for v in by_mode["discard_value"]}
    keep = tuple(p for p in range(len(names)) if p not in dropped)
    if operation == "delete" or not keep:
        reason = "a delete's condition columns are never dropped" if operation == "delete" else "every column was dropped"
        first = by_mode["discard_value"][0]
        return Verdict(QUARANTINE, (Violation(first.rule, "discard_value", first.column, first.position, f"{first.reason}; {reason}"),), where=where)
    return Verdict(TRIM, by_mode["discard_value"], keep, where=where)
