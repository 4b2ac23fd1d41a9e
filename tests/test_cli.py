"""`python -m app`: every command's --help works as a real subprocess; dead-letter replay end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from app.broker import make_broker
from app.pipeline.deadletter import DeadLetterStore, NewDeadLetter
from app.settings import Settings
from tests.support.processes import ROOT

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
    ("backlog",): "Show the broker backlog (messages waiting, oldest age); --wait follows it to empty.",
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
    assert out.stdout.strip() == "replayed 1, could not replay 1"
    assert "replaying dead letters" in out.stderr and "2/2" in out.stderr  # the progress bar, on stderr

    broker = make_broker(settings)
    try:
        messages = broker.pull(10, 1.0)
        assert len(messages) == 1 and messages[0].attributes["table"] == "fixed"
    finally:
        broker.close()

    listed = run_cli("dead-letters", "list", "--json", "--include-replayed", env=env)
    assert listed.returncode == 0
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(e["replayed_at"] is not None for e in entries) == [False, True]


def test_backlog_reports_and_waits_for_drain(tmp_path):
    import asyncio
    import threading
    import time

    from app.broker.local import LocalBroker
    from app.pipeline.codec import encode_batch
    from app.schema.activity import Activity

    settings = Settings(data_dir=tmp_path)
    broker = LocalBroker(settings)
    for i in range(3):
        messages = encode_batch([Activity("insert", f"t{i}", ["n"], ["integer"], [i])], f"batch{i}")
        asyncio.run(broker.publish(messages, batch_id=f"batch{i}"))
    env = {"DATA_DIR": str(tmp_path)}
    out = run_cli("backlog", env=env)
    assert out.returncode == 0 and "3 message(s) waiting" in out.stdout, out.stdout + out.stderr

    def consume():
        time.sleep(1.0)
        while broker.backlog().messages:
            broker.ack(broker.pull(1, 0.5))
            time.sleep(0.3)

    consumer = threading.Thread(target=consume)
    consumer.start()
    out = run_cli("backlog", "--wait", env=env)
    consumer.join()
    broker.close()
    assert out.returncode == 0, out.stderr
    assert "backlog empty" in out.stdout and "3/3" in out.stdout
