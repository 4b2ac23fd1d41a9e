"""Provisioning (app.provision / pubsub.sh) against the Pub/Sub emulator (pstest).

The BigQuery step runs only when a BigQuery emulator is available (a `bigquery_emulator`
fixture or `tests/support/bqemulator.py`); otherwise it is disabled (PROVISION_BIGQUERY=false).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from app import provision as prov
from app.broker.pubsub import make_publisher, make_subscriber
from app.settings import Settings
from tests.support.pstest import running_pstest

pytestmark = pytest.mark.emulator
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pubsub_emulator() -> Iterator[str]:
    with running_pstest() as address, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", address)
        yield address


@pytest.fixture(scope="module")
def bigquery_host() -> Iterator[str]:
    """REST host:port of the session's BigQuery emulator (skips outside CI if it can't start)."""
    from tests.support.bqemulator import shared_emulator

    yield shared_emulator().rest


def names() -> dict[str, str]:
    n = uuid.uuid4().hex[:8]
    return {"pubsub_topic": f"topic-{n}", "pubsub_subscription": f"sub-{n}", "bigquery_dataset": f"ds_{n}"}


def settings_for(bigquery_host: str | None, **overrides) -> Settings:
    values: dict = dict(gcp_project="test-project", ack_deadline_seconds=30, max_delivery_attempts=7, **names())
    if bigquery_host:
        values["bigquery_emulator_host"] = bigquery_host
    values.update(overrides)
    return Settings(**values)


def run(settings: Settings, bigquery_host: str | None) -> prov.Report:
    return prov.provision(settings, bigquery=bigquery_host is not None)


def test_provision_creates_everything_then_changes_nothing(pubsub_emulator, bigquery_host):
    s = settings_for(bigquery_host)
    first = run(s, bigquery_host)
    assert first.changed
    assert all(action == "created" for _, action in first.lines), str(first)

    second = run(s, bigquery_host)
    assert not second.changed, str(second)
    assert [r for r, _ in second.lines] == [r for r, _ in first.lines]
    assert all(action == "exists" for _, action in second.lines), str(second)

    project = "projects/test-project"
    subscriber = make_subscriber(s)
    publisher = make_publisher(s, ordering=False)
    try:
        sub = subscriber.get_subscription(subscription=f"{project}/subscriptions/{s.pubsub_subscription}")
        assert sub.topic == f"{project}/topics/{s.pubsub_topic}"
        assert sub.ack_deadline_seconds == 30
        assert sub.enable_message_ordering is True
        assert sub.dead_letter_policy.dead_letter_topic == f"{project}/topics/{s.pubsub_topic}-dead-letter"
        assert sub.dead_letter_policy.max_delivery_attempts == 7
        assert sub.retry_policy.minimum_backoff.total_seconds() == prov.RETRY_MIN_BACKOFF_SECONDS
        assert sub.retry_policy.maximum_backoff.total_seconds() == prov.RETRY_MAX_BACKOFF_SECONDS

        dl = subscriber.get_subscription(subscription=f"{project}/subscriptions/{s.pubsub_subscription}-dead-letter")
        assert dl.topic == f"{project}/topics/{s.pubsub_topic}-dead-letter"
        publisher.get_topic(topic=f"{project}/topics/{s.pubsub_topic}")
    finally:
        subscriber.close()
        publisher.transport.close()


@pytest.mark.parametrize(("configured", "expected"), [(1, 5), (7, 7), (500, 100)])
def test_delivery_attempts_are_clamped_to_pubsub_range(configured, expected):
    assert prov.delivery_attempts(Settings(max_delivery_attempts=configured)) == expected


@pytest.mark.parametrize(("configured", "expected"), [(1, 10), (30, 30), (5000, 600)])
def test_ack_deadline_is_clamped_to_pubsub_range(configured, expected):
    assert prov.subscription_ack_deadline(Settings(ack_deadline_seconds=configured)) == expected


def test_changed_ack_deadline_is_updated_in_place(pubsub_emulator):
    s = settings_for(None)
    prov.provision_pubsub(s)
    changed = s.model_copy(update={"ack_deadline_seconds": 45})
    report = prov.provision_pubsub(changed)
    sub_path = f"projects/test-project/subscriptions/{s.pubsub_subscription}"
    assert (sub_path, "updated (ack_deadline_seconds)") in report.lines
    subscriber = make_subscriber(s)
    try:
        sub = subscriber.get_subscription(subscription=f"projects/test-project/subscriptions/{s.pubsub_subscription}")
        assert sub.ack_deadline_seconds == 45
    finally:
        subscriber.close()
    assert not prov.provision_pubsub(changed).changed


def script_env(pubsub_emulator: str, bigquery_host: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "BIGQUERY_", "PROVISION_"))}
    n = names()
    env.update(
        PUBSUB_EMULATOR_HOST=pubsub_emulator,
        GCP_PROJECT="test-project",
        PUBSUB_TOPIC=n["pubsub_topic"],
        PUBSUB_SUBSCRIPTION=n["pubsub_subscription"],
        BIGQUERY_DATASET=n["bigquery_dataset"],
    )
    if bigquery_host:
        env["BIGQUERY_EMULATOR_HOST"] = bigquery_host
    else:
        env["PROVISION_BIGQUERY"] = "false"
    env.update(extra)
    return env


def test_pubsub_sh_twice(pubsub_emulator, bigquery_host):
    env = script_env(pubsub_emulator, bigquery_host)
    outputs = []
    for _ in range(2):
        proc = subprocess.run(["bash", "pubsub.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    assert "done: changes made" in outputs[0]
    assert f"projects/test-project/subscriptions/{env['PUBSUB_SUBSCRIPTION']}" in outputs[0]
    assert "done: nothing to change" in outputs[1]
    assert "created" not in outputs[1]


def test_pubsub_sh_no_bigquery_flag(pubsub_emulator):
    env = script_env(pubsub_emulator, None)
    env.pop("PROVISION_BIGQUERY")
    proc = subprocess.run(
        ["bash", "pubsub.sh", "--no-bigquery"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BigQuery" not in proc.stdout and "bigquery dataset" not in proc.stdout


def test_pubsub_sh_needs_a_project_or_an_emulator():
    env = {k: v for k, v in os.environ.items() if k not in {"GCP_PROJECT", "PUBSUB_EMULATOR_HOST"}}
    proc = subprocess.run(["bash", "pubsub.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "GCP_PROJECT" in proc.stderr


def test_main_reports_failure_with_exit_code(monkeypatch, capsys):
    monkeypatch.setenv("PROVISION_BIGQUERY", "false")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setattr(prov, "provision_pubsub", _raise_unavailable)
    assert prov.main([]) == 1
    assert "provisioning failed" in capsys.readouterr().err


def _raise_unavailable(settings, report=None):
    from google.api_core.exceptions import ServiceUnavailable

    raise ServiceUnavailable("emulator down")


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "app.provision", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and "--no-bigquery" in proc.stdout
