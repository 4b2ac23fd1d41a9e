"""`python -m app keys create|list|revoke`: manage `API_KEYS_FILE` (the API picks changes up by itself)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from app.keys.entries import KNOWN_OPERATIONS, KeysFileError, load_keys_file, new_key, revoked, write_keys_file
from app.keys.usage import read_usage, usage_file
from app.settings import get_settings

keys_cli = typer.Typer(help="Create, list and revoke scoped API keys (API_KEYS_FILE).", no_args_is_help=True)

FILE_OPTION = typer.Option(None, "--file", help="The keys file; default API_KEYS_FILE.")


def _keys_path(file: Path | None) -> Path:
    path = file or get_settings().api_keys_file
    if path is None:
        typer.echo("set API_KEYS_FILE (or pass --file) to name the keys file", err=True)
        raise typer.Exit(2)
    return Path(path)


def _load(path: Path, missing_ok: bool = False):
    if missing_ok and not path.exists():
        return []
    try:
        return load_keys_file(path)
    except KeysFileError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@keys_cli.command("create")
def create(
    key_id: str = typer.Option(..., "--id", help="A name for the key: letters, digits, '.', '_', '-'."),
    tables: str = typer.Option("*", "--tables", help="Comma-separated table names or globs, e.g. 'orders*'."),
    ops: str = typer.Option(",".join(KNOWN_OPERATIONS), "--ops", help="Comma-separated operations it may send."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Activities per second (default: no limit)."),
    burst: Optional[float] = typer.Option(None, "--burst", help="Activities at once (default: one second of --rate)."),
    expires: Optional[str] = typer.Option(None, "--expires", help="RFC 3339 time after which the key stops working."),
    file: Optional[Path] = FILE_OPTION,
) -> None:
    """Add a key and print its secret, once: only the secret's SHA-256 is written."""
    path = _keys_path(file)
    keys = _load(path, missing_ok=True)
    if any(k.id == key_id for k in keys):
        typer.echo(f"a key with id {key_id!r} exists already; pick another id (rotate: create a new one, then revoke)", err=True)
        raise typer.Exit(1)
    try:
        when = datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None
        key, secret = new_key(key_id, _split(tables), _split(ops), rate, burst, when)
    except (KeysFileError, ValueError) as exc:
        typer.echo(f"cannot create the key: {exc}", err=True)
        raise typer.Exit(2) from None
    write_keys_file(path, [*keys, key])
    typer.echo(secret)
    typer.echo(f"key {key_id!r} added to {path}; the secret above is not stored, keep it now", err=True)


@keys_cli.command("list")
def list_keys(file: Optional[Path] = FILE_OPTION) -> None:
    """Ids, scopes, state and last use of every key; never secrets."""
    path = _keys_path(file)
    keys = _load(path)
    used = read_usage(usage_file(get_settings().data_dir))
    now = time.time()
    for k in keys:
        state = "disabled" if k.disabled else ("expired" if not k.usable(now) else "active")
        rate = "-" if k.rate is None else f"{k.rate:g}/s burst {k.capacity:g}"
        expires = k.expires.isoformat().replace("+00:00", "Z") if k.expires else "-"
        last = used.get(k.id)
        last_text = "never" if last is None else datetime.fromtimestamp(last, timezone.utc).isoformat(timespec="seconds")
        typer.echo(
            f"{k.id}  {state}  tables={','.join(k.tables)}  ops={','.join(sorted(k.operations))}"
            f"  rate={rate}  expires={expires}  last_used={last_text}"
        )
    typer.echo(f"({len(keys)} key{'s' if len(keys) != 1 else ''} in {path})")


@keys_cli.command("revoke")
def revoke(key_id: str = typer.Argument(..., help="The id of the key to disable."), file: Optional[Path] = FILE_OPTION) -> None:
    """Disable a key: the running API refuses it within seconds, no restart needed."""
    path = _keys_path(file)
    keys = _load(path)
    if not any(k.id == key_id for k in keys):
        typer.echo(f"no key with id {key_id!r} in {path}", err=True)
        raise typer.Exit(1)
    write_keys_file(path, [revoked(k) if k.id == key_id else k for k in keys])
    typer.echo(f"key {key_id!r} revoked")
