"""`python -m app tables apply`: the tables file's options onto the tables that exist.

Each existing table gets the options of its section (through `Warehouse.apply_table_options`,
idempotent); the answer is one line per change, per table left as it was, per option the
warehouse has no meaning for, and per declared table not created yet (it gets its options
when the subscriber creates it).
"""

from __future__ import annotations

from app.contracts.file import TablesConfig
from app.warehouse.base import Warehouse


def apply_all(warehouse: Warehouse, config: TablesConfig) -> list[str]:
    lines: list[str] = []
    existing = warehouse.list_tables()
    for table in existing:
        options = config.settings_for(table).options
        if not options:
            continue
        outcome = warehouse.apply_table_options(table, options)
        if outcome is None:  # dropped meanwhile
            continue
        lines.extend(f"{table}: {change}" for change in outcome.changes)
        if not outcome.changes:
            lines.append(f"{table}: unchanged")
        if outcome.not_applicable:
            lines.append(f"{table}: not applicable on {warehouse.name}: {', '.join(outcome.not_applicable)}")
    present = set(existing)
    for table, settings in config.exact.items():
        if settings.options and table not in present:
            lines.append(f"{table}: not created yet (gets its options when it is)")
    return lines
