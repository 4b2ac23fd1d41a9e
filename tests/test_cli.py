"""`python -m app`: every command's --help works as a real subprocess; dead-letter replay end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from app.broker import make_broker
from app.messages.deadletters import DeadLetterStore, NewDeadLetter
from app.settings import Settings
from tests.support.processes import ROOT
from tests.support.typed_values import TYPED_COLUMNS

# command -> a phrase of its help text (its docstring's first line)
COMMANDS = {
    (): "User-activity ingest pipeline.",
    ("api",): "Run the ingest API (POST /api-log/v1/) on API_HOST:API_PORT.",
    ("subscriber",): "Run the subscriber: pull from the broker, apply to the warehouse.",
    ("run",): "Run the API and the subscriber together (Ctrl-C stops both).",
    ("provision",): "Create the Pub/Sub topic, subscription, dead-letter topic and BigQuery dataset (idempotent).",
    ("query",): "Run a read-only SQL query against the warehouse and print the result.",
    ("dead-letters",): "Inspect and replay the dead-letter store.",
    ("dead-letters", "list"): "List dead letters with their reason, attempts and payload.",
    ("dead-letters", "replay"): "Publish dead letters again (after fixing the table or the data); marks them replayed.",
    ("bench",): "Run the benchmark suite (writes docs/benchmarks.md).",
    ("quarantine",): "Activities a contract quarantined (_ingest_quarantine): list, replay.",
    ("quarantine", "list"): "List quarantined activities with their table, rule and reason, oldest first.",
    ("quarantine", "replay"): "Publish quarantined activities the current tables file allows; the others stay (exit 1).",
    ("tables",): "The tables file (TABLES_FILE): effective settings, checks.",
    ("tables", "check"): "Validate a tables file without starting anything; exit 1 with the line and reason if invalid.",
    ("tables", "apply"): "Apply the tables file's table options to the tables that exist (idempotent); print what changed.",
    ("backlog",): "Show the broker backlog (messages waiting, oldest age); --wait follows it to empty.",
    ("keys",): "Create, list and revoke scoped API keys (API_KEYS_FILE).",
    ("keys", "create"): "Add a key and print its secret, once: only the secret's SHA-256 is written.",
    ("keys", "list"): "Ids, scopes, state and last use of every key; never secrets.",
    ("keys", "revoke"): "Disable a key: the running API refuses it within seconds, no restart needed.",
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)


def _flat(text: str) -> str:
    """Help text without box drawing and with whitespace collapsed (rich wraps and frames it)."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text)).strip()


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: " ".join(c) or "app")
def test_help(command):
    out = run_cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    flat = _flat(out.stdout)
    assert f"Usage: python -m app {' '.join(command)}".replace("  ", " ").strip() in flat, flat
    assert COMMANDS[command] in flat, flat


def test_top_level_help_lists_every_command():
    flat = _flat(run_cli("--help").stdout)
    for name in ("api", "subscriber", "run", "provision", "query", "dead-letters", "bench"):
        assert re.search(rf"\b{re.escape(name)}\b", flat), name
    assert "list" in _flat(run_cli("dead-letters", "--help").stdout)


def test_replay_with_progress(tmp_path):
    settings = Settings(data_dir=tmp_path)
    store = DeadLetterStore(settings.dead_letter_file)
    good = {"operation": "insert", "table": "fixed", "col_names": ["id"], "col_types": ["integer"], "col_values": [1]}
    bad = {"operation": "insert", "table": "fixed", "col_names": ["id"], "col_types": ["integer"], "col_values": ["x"]}
    store.add([
        NewDeadLetter(reason="type conflict", kind="activity", payload=json.dumps(good).encode(), attempts=1,
                      table_name="fixed", dedup_id="b1:fixed:0", activity_index=0),
        NewDeadLetter(reason="type conflict", kind="activity", payload=json.dumps(bad).encode(), attempts=1,
                      table_name="fixed", dedup_id="b1:fixed:0", activity_index=1),
    ])
    store.close()
    env = {"DATA_DIR": str(tmp_path)}

    assert run_cli("dead-letters", "replay", env=env).returncode == 2  # neither ids nor --all

    out = run_cli("dead-letters", "replay", "--all", env=env)
    assert out.returncode == 1, out.stderr  # one could not be replayed
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"#1 replayed as [0-9a-f]{32}", lines[0]), lines
    assert lines[1].startswith("#2 not replayed: ") and "integer" in lines[1], lines
    assert lines[2] == "replayed 1, could not replay 1"
    assert "replaying dead letters" in out.stderr and "2/2" in out.stderr  # the progress bar, on stderr

    broker = make_broker(settings)
    try:
        messages = broker.pull(10, 1.0)
        assert len(messages) == 1 and messages[0].attributes["table"] == "fixed"
    finally:
        broker.close()

    listed = run_cli("dead-letters", "list", "--json", "--include-replayed", env=env)
    assert listed.returncode == 0
    entries = {e["id"]: e for e in map(json.loads, listed.stdout.splitlines())}
    assert entries[1]["replayed_at"] is not None and lines[0].endswith(entries[1]["replayed_batch_id"])
    assert entries[2]["replayed_at"] is None and entries[2]["replayed_batch_id"] is None
    text = run_cli("dead-letters", "list", "--include-replayed", env=env).stdout
    assert f"replayed as {entries[1]['replayed_batch_id']}" in text


def test_keys_create_list_revoke(tmp_path):
    from app.keys import load_keys_file
    from app.keys.usage import usage_file

    env = {"DATA_DIR": str(tmp_path), "API_KEYS_FILE": str(tmp_path / "keys.toml")}
    created = run_cli("keys", "create", "--id", "orders-backend", "--tables", "orders*", "--ops", "insert,upsert",
                      "--rate", "5000", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert "not stored" in created.stderr and secret not in (tmp_path / "keys.toml").read_text()
    assert run_cli("keys", "create", "--id", "orders-backend", env=env).returncode == 1  # ids are unique
    assert run_cli("keys", "create", "--id", "x", "--ops", "drop", env=env).returncode == 2
    [key] = load_keys_file(tmp_path / "keys.toml")
    assert key.tables == ("orders*",) and key.operations == {"insert", "upsert"} and key.rate == 5000

    usage_file(tmp_path).write_text('{"orders-backend": 1767225600.0}')
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == (
        "orders-backend  active  tables=orders*  ops=insert,upsert  rate=5000/s burst 5000  expires=-"
        "  last_used=2026-01-01T00:00:00+00:00"
    )
    assert secret not in listed.stdout

    assert run_cli("keys", "revoke", "nobody", env=env).returncode == 1
    assert run_cli("keys", "revoke", "orders-backend", env=env).returncode == 0
    assert "orders-backend  disabled" in run_cli("keys", "list", env=env).stdout
    assert run_cli("keys", "list", env={"DATA_DIR": str(tmp_path)}).returncode == 2  # no file named


def test_backlog_reports_and_waits_for_drain(tmp_path):
    import asyncio
    import time

    from app.broker.local import LocalBroker
    from app.messages.codec import encode_batch
    from app.schema.activity import Activity

    settings = Settings(data_dir=tmp_path)
    broker = LocalBroker(settings)
    for i in range(3):
        messages = encode_batch([Activity("insert", f"t{i}", ["n"], ["integer"], [i])], f"batch{i}")
        asyncio.run(broker.publish(messages, batch_id=f"batch{i}"))
    env = {"DATA_DIR": str(tmp_path)}
    out = run_cli("backlog", env=env)
    assert out.returncode == 0 and "3 message(s) waiting" in out.stdout, out.stdout + out.stderr

    full_env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT), **env}
    waiting = subprocess.Popen([sys.executable, "-m", "app", "backlog", "--wait"], cwd=ROOT, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = waiting.stdout.readline()  # it has counted the backlog: drain it now
        assert "3 message(s) waiting" in first, first
        while broker.backlog().messages:
            broker.ack(broker.pull(1, 0.5))
            time.sleep(0.3)
        rest, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
        broker.close()
    assert waiting.returncode == 0, err
    assert "backlog empty" in rest and "3/3" in rest


# ------------------------------------------------------------------ query output

TYPED_SQL = "SELECT * EXCLUDE (id) FROM every_type ORDER BY id"


def _write_every_type(settings: Settings) -> None:
    from app.schema.activity import Activity
    from app.warehouse.base import Envelope
    from app.warehouse.duckdb import DuckDBWarehouse

    names = ["id"] + [c[0] for c in TYPED_COLUMNS]
    types = ["integer"] + [c[1] for c in TYPED_COLUMNS]
    activities = [Activity("insert", "every_type", names, types, [row] + [c[2][row] for c in TYPED_COLUMNS]) for row in range(3)]
    warehouse = DuckDBWarehouse(settings)
    try:
        result = warehouse.apply("every_type", [Envelope("b:every_type:0", "every_type", activities)])
        assert result.rows_inserted == 3 and not result.rejections, result
    finally:
        warehouse.close()


def _text(value) -> str:
    """How the table and CSV formats print a rendered value."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _assert_every_format(run) -> None:
    columns = [c[0] for c in TYPED_COLUMNS]
    expected = [{c[0]: c[3][row] for c in TYPED_COLUMNS} for row in range(3)]

    out = run("query", TYPED_SQL, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected

    import csv
    import io

    out = run("query", TYPED_SQL, "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert list(csv.reader(io.StringIO(out.stdout))) == [columns] + [[_text(r[c]) for c in columns] for r in expected]

    out = run("query", TYPED_SQL)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == columns
    assert [[c.strip() for c in line.split(" | ")] for line in lines[2:5]] == [[_text(r[c]) for c in columns] for r in expected]
    assert lines[5] == "(3 rows)"


def test_query_renders_every_type_from_the_file(tmp_path):
    settings = Settings(data_dir=tmp_path)
    _write_every_type(settings)
    env = {"DATA_DIR": str(tmp_path), "SUBSCRIBER_PORT": str(_free_port())}  # no subscriber: the file directly
    _assert_every_format(lambda *args: run_cli(*args, env=env))


def test_query_renders_every_type_through_the_admin_port(tmp_path):
    from tests.support.processes import Pipeline

    p = Pipeline.create(tmp_path)
    _write_every_type(Settings(data_dir=p.data_dir))
    p.start("subscriber")  # holds the file: the CLI can only read through the admin port
    try:
        _assert_every_format(p.cli)
    finally:
        p.stop()


def _free_port() -> int:
    from tests.support.processes import free_port

    return free_port()


def test_query_waits_for_a_starting_subscribers_admin_port(tmp_path):
    """The subscriber holds the file before its admin port is up: `query` waits for the port."""
    from app.broker import make_broker
    from app.pipeline.admin import AdminServer
    from app.pipeline.subscriber import Subscriber
    from app.warehouse.duckdb import DuckDBWarehouse

    port = _free_port()
    settings = Settings(data_dir=tmp_path, subscriber_port=port)
    _write_every_type(settings)
    env = {"DATA_DIR": str(tmp_path), "SUBSCRIBER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    warehouse = DuckDBWarehouse(settings)
    assert warehouse.table_schema("every_type")  # connected: the file is now locked
    broker, store = make_broker(settings), DeadLetterStore(settings.dead_letter_file)
    admin = waiting = None
    try:
        gave_up = run_cli("query", "SELECT count(*) AS n FROM every_type", "--wait", "1", env=env)
        assert gave_up.returncode == 1
        assert "locked by another process" in gave_up.stderr and "no admin port answered within 1s" in gave_up.stderr

        waiting = subprocess.Popen(
            [sys.executable, "-m", "app", "query", "SELECT count(*) AS n FROM every_type", "--format", "json"],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        note = waiting.stderr.readline()  # printed once it found the file locked: it now polls the port
        assert "waiting up to 30s for the subscriber's admin port" in note and waiting.poll() is None
        admin = AdminServer(Subscriber(settings, broker, warehouse, store), "127.0.0.1", port)
        admin.start()
        stdout, stderr = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, stderr
        assert json.loads(stdout) == [{"n": 3}]
    finally:
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        if admin is not None:
            admin.stop()
        warehouse.close()
        broker.close()
        store.close()



# ---------------------------------------------------------------- the broker's own dead letters


def test_broker_dead_letters_are_listed_and_replayed_through_the_broker_interface(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app import cli
    from app.broker.base import OutgoingMessage
    from tests.support.memory_broker import MemoryBroker  # registers BROKER=memory

    settings = Settings(broker="memory", data_dir=tmp_path)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    broker = MemoryBroker.open(settings)
    broker.put([OutgoingMessage(b'{"v": 1}', "t", {"table": "t", "dedup_id": "b:t:0"})])
    [received] = broker.pull(1, 1.0)
    broker.forward_dead_letters([(received, "undecodable: not JSON")])
    broker.ack([received])

    listed = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-list"])
    assert listed.exit_code == 0, listed.output
    assert re.search(r"table=t age=\d+s reason=undecodable: not JSON", listed.output)
    assert "(1 dead letter on memory:" in listed.output
    replayed = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-replay", "--include-forwarded"])
    assert replayed.exit_code == 0 and replayed.output.startswith("replayed 1, left 0 on memory:")
    assert [m.data for m in broker.pull(10, 1.0)] == [b'{"v": 1}']


def test_broker_dead_letter_commands_refuse_a_broker_without_a_destination_of_its_own(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app import cli

    monkeypatch.setattr(cli, "get_settings", lambda: Settings(data_dir=tmp_path))
    for command in ("pubsub-list", "pubsub-replay"):
        result = CliRunner().invoke(cli.cli, ["dead-letters", command])
        assert result.exit_code == 1
        assert "the local broker has no dead-letter destination of its own" in result.output


def test_tables_check_and_listing(tmp_path):
    good = tmp_path / "tables.toml"
    good.write_text("[defaults]\nnew_tables = 'refuse'\n\n[tables.orders]\ncolumns = {id = 'integer'}\ncontract = 'freeze'\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tables.orders]\ncolumns = {id = 'int'}\n")
    ok = run_cli("tables", "check", str(good))
    assert ok.returncode == 0 and "ok:" in ok.stdout and "1 table(s)" in ok.stdout
    refused = run_cli("tables", "check", str(bad))
    assert refused.returncode == 1 and f"{bad}:2: column 'id' has unknown type 'int'" in refused.stderr
    listed = run_cli("tables", env={"TABLES_FILE": str(good)})
    assert listed.returncode == 0
    assert f"new tables: refuse  ({good}:2)" in listed.stdout
    assert f"[tables.orders]\n  contract: freeze  ({good}:6)\n  columns: id integer  ({good}:5)" in listed.stdout


@pytest.mark.parametrize("process", ["api", "subscriber"])
def test_an_invalid_tables_file_stops_each_process_at_start_with_line_and_reason(tmp_path, process):
    bad = tmp_path / "tables.toml"
    bad.write_text("[defaults]\nnew_tables = 'sometimes'\n")
    started = run_cli(process, env={"TABLES_FILE": str(bad), "DATA_DIR": str(tmp_path)})
    assert started.returncode == 2
    assert f"{bad}:2: new_tables must be one of allow, refuse" in started.stdout + started.stderr


def test_tables_apply_prints_what_changed_once_and_what_does_not_apply(tmp_path):
    from app.warehouse.duckdb import DuckDBWarehouse
    from tests.support.builders import env as envelope, ins

    warehouse = DuckDBWarehouse(Settings(data_dir=tmp_path))
    warehouse.apply("orders", [envelope("orders", ins("orders", [("id", "integer")], [1]))])
    warehouse.close()
    tables = tmp_path / "tables.toml"
    tables.write_text(
        "[tables.orders]\ndescription = \"the shop's orders\"\nlabels = {team = \"data\"}\n\n"
        "[tables.refunds]\ndescription = \"later\"\n"
    )
    env = {"DATA_DIR": str(tmp_path), "TABLES_FILE": str(tables), "SUBSCRIBER_PORT": str(_free_port())}
    first, second = run_cli("tables", "apply", env=env), run_cli("tables", "apply", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.splitlines() == [
        "orders: description: None -> \"the shop's orders\"",
        "orders: not applicable on duckdb: labels",
        "refunds: not created yet (gets its options when it is)",
    ]
    assert second.stdout.splitlines()[0] == "orders: unchanged"
