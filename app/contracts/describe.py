"""`python -m app tables`: each section's effective settings and the file line they come from."""

from __future__ import annotations

from typing import Any

from app.contracts.file import TableSettings, TablesConfig


def _value(settings: TableSettings, name: str) -> Any:
    if name == "contract":
        return settings.contract.describe()
    if name == "columns":
        return ", ".join(f"{c} {t}" for c, t in settings.columns.items()) or "(none declared)"
    if name == "key":
        return ", ".join(settings.key)
    if name == "pii":
        return ", ".join(f"{c} {p}" for c, p in settings.pii.items())
    return settings.options[name]


def _where(settings: TableSettings, name: str, path: str) -> str:
    line = settings.lines.get(name)
    return f"{path}:{line}" if line else "built-in default"


def describe(config: TablesConfig) -> list[str]:
    lines = [f"new tables: {config.new_tables}  ({_where_line(config.new_tables_line, config.path)})"]
    sections = [("[defaults]", config.defaults), *((f"[tables.{n}]", s) for n, s in config.exact.items()),
                *((f'[tables."{p}"] (glob)', s) for p, s in config.globs)]
    for title, settings in sections:
        lines.append(title)
        names = ["contract", "columns", "key", "pii", *settings.options] if settings.declared else ["contract", *settings.options]
        for name in names:
            if name in ("key", "pii") and not getattr(settings, name):
                continue
            lines.append(f"  {name}: {_value(settings, name)}  ({_where(settings, name, config.path)})")
    return lines


def _where_line(line: int, path: str) -> str:
    return f"{path}:{line}" if line else "built-in default"
