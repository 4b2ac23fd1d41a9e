"""`python -m app`: one CLI for running, provisioning, querying and dead letters."""

from __future__ import annotations

import sys
from typing import Any, Optional

import orjson
import typer

from app.keys.commands import keys_cli
from app.settings import get_settings

cli = typer.Typer(help="User-activity ingest pipeline.", no_args_is_help=True, add_completion=False)
dead_letters_cli = typer.Typer(help="Inspect and replay the dead-letter store.", no_args_is_help=True)
cli.add_typer(dead_letters_cli, name="dead-letters")
cli.add_typer(keys_cli, name="keys")
quarantine_cli = typer.Typer(help="Activities a contract quarantined (_ingest_quarantine): list, replay.", no_args_is_help=True)
cli.add_typer(quarantine_cli, name="quarantine")
tables_cli = typer.Typer(help="The tables file (TABLES_FILE): effective settings, checks.", invoke_without_command=True)
cli.add_typer(tables_cli, name="tables")


@cli.command()
def api() -> None:
    """Run the ingest API (POST /api-log/v1/) on API_HOST:API_PORT."""
    from app.runtime import run_api

    run_api()


@cli.command()
def subscriber() -> None:
    """Run the subscriber: pull from the broker, apply to the warehouse."""
    from app.runtime import run_subscriber

    run_subscriber()


@cli.command()
def run() -> None:
    """Run the API and the subscriber together (Ctrl-C stops both)."""
    from app.runtime import run_both

    raise typer.Exit(run_both())


@cli.command()
def provision() -> None:
    """Create the Pub/Sub topic, subscription, dead-letter topic and BigQuery dataset (idempotent)."""
    from app.provision import main as provision_main

    raise typer.Exit(provision_main([]))  # not sys.argv: it holds the word `provision`


Rendered = tuple[list[str], list[str | None], list[list[Any]]]  # columns, activity types, rendered rows


def _query_via_subscriber(sql: str) -> Rendered:
    from app.admin_client import admin_request

    body = admin_request(get_settings(), "/query", {"sql": sql})
    return body["columns"], body.get("types") or [], body["rows"]


def _query_directly(sql: str) -> Rendered:
    """Read the warehouse from this process (opened read-only: a DuckDB file without the writer's lock)."""
    from app.pipeline.render import render_rows
    from app.warehouse import open_read_only

    warehouse = open_read_only(get_settings())
    try:
        result = warehouse.query(sql)
    finally:
        warehouse.close()
    columns, rows = result
    return columns, result.types, render_rows(rows, result.types)


def _waiting_note(wait: float) -> None:
    from app.admin_client import admin_url

    typer.echo(f"the warehouse file is locked (a subscriber starting?); waiting up to {wait:.0f}s for the subscriber's"
               f" admin port on {admin_url(get_settings())}", err=True)


def _run_query(sql: str, wait: float) -> Rendered:
    """Through the running subscriber (which holds the DuckDB file) when there is one."""
    from app.admin_client import AdminError, SubscriberNotReady, through_subscriber
    from app.warehouse import WarehouseQueryError

    try:
        return through_subscriber(
            lambda: _query_via_subscriber(sql), lambda: _query_directly(sql), wait, lambda: _waiting_note(wait)
        )
    except (AdminError, SubscriberNotReady, WarehouseQueryError) as exc:
        typer.echo(f"query failed: {exc}", err=True)
        raise typer.Exit(1) from None


@cli.command()
def query(
    sql: str = typer.Argument(..., help="A read-only SQL query."),
    output: str = typer.Option("table", "--format", help="table | json | csv"),
    wait: float = typer.Option(30.0, help="Seconds to wait for a starting subscriber's admin port when it holds the file."),
) -> None:
    """Run a read-only SQL query against the warehouse and print the result.

    Goes through the running subscriber (which holds the DuckDB file) when there is one.
    Values print as BigQuery shows them: WKT, base64 bytes, NaN/Infinity, plain decimals.
    """
    from app.pipeline.render import cell_text, json_value

    if output not in ("table", "json", "csv"):
        typer.echo(f"--format must be table, json or csv, got {output!r}", err=True)
        raise typer.Exit(2)
    columns, types, rows = _run_query(sql, wait)
    if output == "json":
        kinds = list(types) + [None] * (len(columns) - len(types))
        typer.echo(orjson.dumps([{c: json_value(v, k) for c, v, k in zip(columns, r, kinds)} for r in rows]).decode())
        return
    cells = [[cell_text(v) for v in r] for r in rows]
    if output == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(cells)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    typer.echo("-+-".join("-" * w for w in widths))
    for r in cells:
        typer.echo(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
    typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


@dead_letters_cli.command("list")
def dead_letters_list(
    limit: int = typer.Option(50, help="How many, newest first."),
    include_replayed: bool = typer.Option(False, "--include-replayed", help="Also show entries already replayed."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List dead letters with their reason, attempts and payload."""
    from app.messages.deadletters import DeadLetterStore

    store = DeadLetterStore(get_settings().dead_letter_file)
    entries = store.list(limit=limit, include_replayed=include_replayed)
    for e in entries:
        if as_json:
            typer.echo(
                orjson.dumps(
                    {
                        "id": e.id, "created_at": e.created_at, "reason": e.reason, "kind": e.kind,
                        "table": e.table_name, "attempts": e.attempts, "dedup_id": e.dedup_id,
                        "activity_index": e.activity_index, "replayed_at": e.replayed_at,
                        "replayed_batch_id": e.replayed_batch_id, "replay_of": e.replay_of, "key_id": e.key_id,
                        "payload": e.payload_json() if e.payload_json() is not None else e.payload.decode("utf-8", "replace"),
                    }
                ).decode()
            )
        else:
            links = (f" (replay of #{e.replay_of})" if e.replay_of is not None else "") + (
                f" replayed as {e.replayed_batch_id}" if e.replayed_batch_id else ""
            )
            typer.echo(f"#{e.id} [{e.kind}] table={e.table_name} attempts={e.attempts}{links} reason={e.reason}")
            typer.echo(f"    payload: {e.payload[:300].decode('utf-8', 'replace')}")
    if not as_json:
        typer.echo(f"({len(entries)} dead letter{'s' if len(entries) != 1 else ''})")


@dead_letters_cli.command("replay")
def dead_letters_replay(
    ids: Optional[list[int]] = typer.Argument(None, help="Ids to replay (see `dead-letters list`)."),
    replay_all: bool = typer.Option(False, "--all", help="Replay every entry not replayed yet."),
    force: bool = typer.Option(
        False, "--force", help="Replay entries even if they overwrite or duplicate what their table got since."
    ),
) -> None:
    """Publish dead letters again (after fixing the table or the data); marks them replayed.

    Each entry is first checked against the edge validator and the table's current
    schema; one that would fail again stays, is reported with why, and the exit code is 1.
    So is one that would delete rows or add values its table got since the failure (a
    replay applies after everything since), unless --force.
    """
    from app.pipeline.replay import replay

    if not ids and not replay_all:
        typer.echo("name ids to replay, or --all", err=True)
        raise typer.Exit(2)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # The bar goes to stderr (and only when it is a terminal), so stdout stays parseable.
    with Progress(
        TextColumn("replaying dead letters"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task("replay", total=None)
        outcomes = replay(
            get_settings(), ids or None, progress=lambda n, total: bar.update(task, completed=n, total=total), force=force
        )
    for o in outcomes:
        if o.problem is not None:
            typer.echo(f"#{o.entry_id} not replayed: {o.problem}")
        else:
            typer.echo(f"#{o.entry_id} replayed as {o.batch_id}" + (f" (forced: {o.changes})" if o.changes else ""))
    failed = sum(o.problem is not None for o in outcomes)
    typer.echo(f"replayed {len(outcomes) - failed}, could not replay {failed}")
    raise typer.Exit(1 if failed else 0)


# --- tables file (docs/contracts.md) ---


@tables_cli.callback()
def tables(ctx: typer.Context) -> None:
    """List each table section's effective settings and the file line each comes from."""
    if ctx.invoked_subcommand is not None:
        return
    from app.contracts.describe import describe
    from app.contracts.file import TablesFileInvalid, load

    path = get_settings().tables_file
    if path is None:
        typer.echo("no tables file (TABLES_FILE is not set): every table evolves as sent")
        return
    try:
        config = load(path)
    except TablesFileInvalid as exc:
        typer.echo(f"invalid: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in describe(config):
        typer.echo(line)


@tables_cli.command("check")
def tables_check(path: str = typer.Argument(..., help="The tables file to validate.")) -> None:
    """Validate a tables file without starting anything; exit 1 with the line and reason if invalid."""
    from pathlib import Path

    from app.contracts.file import TablesFileInvalid, load

    try:
        config = load(Path(path))
    except TablesFileInvalid as exc:
        typer.echo(f"invalid: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok: {path} ({len(config.exact)} table(s), {len(config.globs)} glob(s))")


@tables_cli.command("apply")
def tables_apply() -> None:
    """Apply the tables file's table options to the tables that exist (idempotent); print what changed."""
    from app.admin_client import AdminError, admin_request, through_subscriber
    from app.contracts.file import TablesFileInvalid, load
    from app.pipeline.table_options import apply_all
    from app.warehouse import TransientWarehouseError, open_warehouse

    settings = get_settings()
    if settings.tables_file is None:
        typer.echo("no tables file (TABLES_FILE is not set): no options to apply", err=True)
        raise typer.Exit(1)

    def directly() -> list[str]:
        warehouse = open_warehouse(settings)
        try:
            return apply_all(warehouse, load(settings.tables_file))
        finally:
            warehouse.close()

    try:
        lines = through_subscriber(lambda: admin_request(settings, "/table-options", {})["lines"], directly, 0)
    except TablesFileInvalid as exc:
        typer.echo(f"invalid: {exc}", err=True)
        raise typer.Exit(1) from None
    except (AdminError, TransientWarehouseError) as exc:
        typer.echo(f"not applied: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in lines or ["no table has options to apply"]:
        typer.echo(line)


# --- quarantine (docs/contracts.md#quarantine) ---


@quarantine_cli.command("list")
def quarantine_list(
    table: Optional[str] = typer.Option(None, "--table", help="Only this table's activities."),
    since: Optional[str] = typer.Option(None, "--since", help="Only those received at or after this timestamp."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List quarantined activities with their table, rule and reason, oldest first."""
    from app.pipeline.quarantine import list_entries

    try:
        entries = list_entries(get_settings(), table, since)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for e in entries:
        if as_json:
            typer.echo(orjson.dumps({name: getattr(e, name) for name in e.__slots__}).decode())
        else:
            typer.echo(f"{e.received_at} {e.batch_id}[{e.activity_index}] table={e.table_name} rule={e.rule} reason={e.reason}")
    if not as_json:
        typer.echo(f"({len(entries)} quarantined activit{'y' if len(entries) == 1 else 'ies'})")


@quarantine_cli.command("replay")
def quarantine_replay(
    table: Optional[str] = typer.Option(None, "--table", help="Only this table's activities."),
    since: Optional[str] = typer.Option(None, "--since", help="Only those received at or after this timestamp."),
) -> None:
    """Publish quarantined activities the current tables file allows; the others stay (exit 1)."""
    from app.pipeline.quarantine import replay

    try:
        outcomes = replay(get_settings(), table, since)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for o in outcomes:
        name = f"{o.entry.batch_id}[{o.entry.activity_index}]"
        typer.echo(f"{name} replayed as {o.batch_id}" if o.problem is None else f"{name} not replayed: {o.problem}")
    failed = sum(o.problem is not None for o in outcomes)
    typer.echo(f"replayed {len(outcomes) - failed}, could not replay {failed}")
    raise typer.Exit(1 if failed else 0)


def _broker_dead_letters():
    """The configured broker and its own dead-letter destination; exit 1 if it has none."""
    from app.broker import make_broker

    broker = make_broker(get_settings())
    source = broker.dead_letter_source()
    if source is None:
        broker.close()
        typer.echo(f"the {broker.name} broker has no dead-letter destination of its own", err=True)
        raise typer.Exit(1)
    return broker, source


def _age(published_at: float | None) -> str:
    import time

    return "-" if published_at is None else f"{max(0.0, time.time() - published_at):.0f}s"


def _kind(dead_letter) -> str:
    """`activity` (one the warehouse refused) or `message` (a whole one)."""
    from app.messages.deadletters import KIND_ATTRIBUTE

    return dead_letter.attributes.get(KIND_ATTRIBUTE, "message")


@dead_letters_cli.command("pubsub-list")
def dead_letters_pubsub_list(
    limit: int = typer.Option(50, help="How many, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List the Pub/Sub dead-letter subscription (leased briefly, then given back)."""
    from app.messages.codec import readable_body

    broker, source = _broker_dead_letters()
    try:
        messages = source.list(limit)
    finally:
        source.close()
        broker.close()
    for m in messages:
        if as_json:
            typer.echo(orjson.dumps({
                "message_id": m.message_id, "kind": _kind(m), "table": m.table, "reason": m.reason,
                "published_at": m.published_at,
                "forwarded_by_pipeline": m.forwarded_by_pipeline, "attributes": m.attributes,
                "data": readable_body(m.data).decode("utf-8", "replace"),  # format 2 rendered as JSON
            }).decode())
        else:
            typer.echo(f"{m.message_id} kind={_kind(m)} table={m.table} age={_age(m.published_at)} reason={m.reason}")
    if not as_json:
        typer.echo(f"({len(messages)} dead letter{'s' if len(messages) != 1 else ''} on {source.path})")


@dead_letters_cli.command("pubsub-replay")
def dead_letters_pubsub_replay(
    limit: int = typer.Option(1000, help="Replay at most this many, oldest first."),
    include_forwarded: bool = typer.Option(
        False, "--include-forwarded",
        help="Also those the pipeline forwarded, whole messages and refused activities (they are in the "
        "dead-letter store of the replica that refused them too, unless its disk is gone).",
    ),
) -> None:
    """Re-publish what Pub/Sub dead-lettered to the main topic (same ordering key), then ack it."""
    broker, source = _broker_dead_letters()
    try:
        replayed, left = source.replay(limit, include_forwarded=include_forwarded)
    finally:
        source.close()
        broker.close()
    typer.echo(f"replayed {replayed}, left {left} on {source.path}")


@cli.command()
def batch(batch_id: str = typer.Argument(..., help="The batch id from the POST answer.")) -> None:
    """Print what became of a batch, per table (its delivery receipt, as JSON)."""
    from app.receipts import BATCH_ID_PATTERN, open_receipts

    store = open_receipts(get_settings())
    try:
        receipt = store.lookup(batch_id) if BATCH_ID_PATTERN.match(batch_id) else None
        purged = receipt is None and BATCH_ID_PATTERN.match(batch_id) is not None and store.gone(batch_id)[0]
    finally:
        store.close()
    if receipt is None:
        typer.echo("the batch's receipt is past its retention" if purged else f"no batch {batch_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(orjson.dumps(receipt.as_json(), option=orjson.OPT_INDENT_2).decode())


@cli.command()
def backlog(
    wait: bool = typer.Option(False, "--wait", help="Show a progress bar until the backlog has drained."),
    timeout: float = typer.Option(3600.0, help="With --wait: give up after this many seconds."),
) -> None:
    """Show the broker backlog (messages waiting, oldest age); --wait follows it to empty."""
    import time

    from app.broker import make_broker

    broker = make_broker(get_settings())
    try:
        stats = broker.backlog()
        if stats is None:
            typer.echo("this broker does not report its backlog (Pub/Sub: see Cloud Monitoring)")
            raise typer.Exit(0)
        age = f"{stats.oldest_age_seconds:.1f}s" if stats.oldest_age_seconds is not None else "-"
        typer.echo(f"{stats.messages} message(s) waiting, oldest {age}")
        if not wait or stats.messages == 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        start = stats.messages
        deadline = time.monotonic() + timeout
        with Progress(TextColumn("draining"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False) as bar:
            task = bar.add_task("drain", total=start)
            while stats.messages > 0:
                if time.monotonic() > deadline:
                    typer.echo(f"still {stats.messages} waiting after {timeout:.0f}s", err=True)
                    raise typer.Exit(1)
                time.sleep(0.5)
                stats = broker.backlog()
                start = max(start, stats.messages)
                bar.update(task, total=start, completed=start - stats.messages)
        typer.echo("backlog empty")
    finally:
        broker.close()


@cli.command()
def bench(args: Optional[list[str]] = typer.Argument(None, help="Arguments for scripts/bench.py.")) -> None:
    """Run the benchmark suite (writes docs/benchmarks.md)."""
    import runpy

    sys.argv = ["scripts/bench.py", *(args or [])]
    runpy.run_path("scripts/bench.py", run_name="__main__")


def main() -> None:
    cli()
