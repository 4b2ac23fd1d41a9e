"""Provisioning (app.provision / pubsub.sh): against pstest and bqemulator, and the IAM
grant path with fake IAM clients (pstest does not implement the IAM service)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.iam.v1 import policy_pb2
from google.protobuf import duration_pb2
from google.pubsub_v1 import types as ps
from pydantic import ValidationError

from app import provision as prov
from app.broker.pubsub import make_publisher, make_subscriber
from app.settings import Settings
from tests.support.pstest import running_pstest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "projects/test-project"
emulator = pytest.mark.emulator


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


@pytest.fixture
def clients(pubsub_emulator):
    s = Settings(gcp_project="test-project")
    publisher, subscriber = make_publisher(s, ordering=False), make_subscriber(s)
    yield publisher, subscriber
    subscriber.close()
    publisher.transport.close()


def names() -> dict[str, str]:
    n = uuid.uuid4().hex[:8]
    return {"pubsub_topic": f"topic-{n}", "pubsub_subscription": f"sub-{n}", "bigquery_dataset": f"ds_{n}"}


def settings_for(bigquery_host: str | None = None, **overrides) -> Settings:
    values: dict = dict(gcp_project="test-project", ack_deadline_seconds=30, **names())
    if bigquery_host:
        values["bigquery_emulator_host"] = bigquery_host
    values.update(overrides)
    return Settings(**values)


def sub_path(s: Settings, suffix: str = "") -> str:
    return f"{PROJECT}/subscriptions/{s.pubsub_subscription}{suffix}"


def topic_path(s: Settings, suffix: str = "") -> str:
    return f"{PROJECT}/topics/{s.pubsub_topic}{suffix}"


def never_expires(sub) -> bool:
    return sub._pb.HasField("expiration_policy") and not sub._pb.expiration_policy.HasField("ttl")


def actions_for(report: prov.Report, resource: str) -> list[str]:
    return [action for r, action in report.lines if r == resource]


# --------------------------------------------------------------------------- emulators


@emulator
def test_provision_creates_everything_then_changes_nothing(pubsub_emulator, bigquery_host, clients):
    s = settings_for(bigquery_host)
    first = prov.provision(s)
    assert first.changed
    for resource in (topic_path(s), topic_path(s, "-dead-letter"), sub_path(s), sub_path(s, "-dead-letter")):
        assert actions_for(first, resource)[0] == "created", str(first)
    assert (f"bigquery dataset test-project.{s.bigquery_dataset}", "created (in US)") in first.lines

    second = prov.provision(s)
    assert not second.changed, str(second)
    assert [r for r, _ in second.lines] == [r for r, _ in first.lines]
    assert {a for _, a in second.lines} == {"exists"}, str(second)

    publisher, subscriber = clients
    sub = subscriber.get_subscription(subscription=sub_path(s))
    assert sub.topic == topic_path(s)
    assert sub.ack_deadline_seconds == 30
    assert sub.enable_message_ordering is True
    assert sub.enable_exactly_once_delivery is True
    assert never_expires(sub)
    assert sub.message_retention_duration == timedelta(days=7)
    assert sub.dead_letter_policy.dead_letter_topic == topic_path(s, "-dead-letter")
    assert sub.dead_letter_policy.max_delivery_attempts == 100
    assert sub.retry_policy.minimum_backoff.total_seconds() == prov.RETRY_MIN_BACKOFF_SECONDS
    assert sub.retry_policy.maximum_backoff.total_seconds() == prov.RETRY_MAX_BACKOFF_SECONDS

    dl = subscriber.get_subscription(subscription=sub_path(s, "-dead-letter"))
    assert dl.topic == topic_path(s, "-dead-letter")
    assert never_expires(dl), "dead letters must outlive 31 idle days"
    assert dl.message_retention_duration == timedelta(days=7)
    publisher.get_topic(topic=topic_path(s))


@emulator
def test_max_delivery_attempts_comes_from_its_own_setting(pubsub_emulator, clients):
    s = settings_for(pubsub_max_delivery_attempts=12, max_delivery_attempts=3)
    prov.provision_pubsub(s)
    sub = clients[1].get_subscription(subscription=sub_path(s))
    assert sub.dead_letter_policy.max_delivery_attempts == 12


@emulator
def test_changed_ack_deadline_is_updated_in_place(pubsub_emulator, clients):
    s = settings_for()
    prov.provision_pubsub(s)
    changed = s.model_copy(update={"ack_deadline_seconds": 45})
    report = prov.provision_pubsub(changed)
    assert "updated (ack_deadline_seconds)" in actions_for(report, sub_path(s))
    assert clients[1].get_subscription(subscription=sub_path(s)).ack_deadline_seconds == 45
    assert not prov.provision_pubsub(changed).changed


@emulator
def test_subscription_without_exactly_once_delivery_is_updated_or_reported(pubsub_emulator, clients):
    """A subscription made before exactly-once delivery was wanted: provisioning asks for it
    by an update. pstest's UpdateSubscription refuses that field (Google accepts it), so
    here the refusal is reported with the gcloud command, every run until it is done."""
    s = settings_for()
    publisher, subscriber = clients
    publisher.create_topic(name=topic_path(s))
    wanted = prov.main_subscription(s, prov.PubSubNames.of(s))
    wanted.enable_exactly_once_delivery = False
    subscriber.create_subscription(request=wanted)

    report = prov.provision_pubsub(s)
    assert actions_for(report, sub_path(s)) == ["differs (enable_exactly_once_delivery)"], str(report)
    step = next(m for m in report.manual if m.what == f"update enable_exactly_once_delivery of {sub_path(s)}")
    assert step.commands == [
        f"gcloud pubsub subscriptions update {s.pubsub_subscription} --project=test-project "
        "--enable-exactly-once-delivery"
    ]
    again = prov.provision_pubsub(s)
    assert actions_for(again, sub_path(s)) == ["differs (enable_exactly_once_delivery)"]


def test_exactly_once_delivery_drift_is_updated_with_a_field_mask():
    s = settings_for()
    names = prov.PubSubNames.of(s)
    current = prov.main_subscription(s, names)
    current.enable_exactly_once_delivery = False
    updates = []

    class Subscriber:
        def create_subscription(self, request):
            from google.api_core import exceptions as gexc

            raise gexc.AlreadyExists("exists")

        def get_subscription(self, request):
            return current

        def update_subscription(self, request):
            updates.append((request["subscription"].enable_exactly_once_delivery, list(request["update_mask"].paths)))

    report = prov.Report()
    prov.PubSubProvisioner(s, None, Subscriber(), report).ensure_subscription(prov.main_subscription(s, names))
    assert updates == [(True, ["enable_exactly_once_delivery"])]
    assert actions_for(report, sub_path(s)) == ["updated (enable_exactly_once_delivery)"]


@emulator
def test_drifted_subscription_is_updated_and_what_cannot_be_is_reported(pubsub_emulator, clients):
    """An old subscription (31-day expiry, short retention, no policies) is brought up to date.

    pstest's UpdateSubscription refuses enable_exactly_once_delivery, dead_letter_policy and
    retry_policy (Google accepts them), so those exercise the "report what could not be done" path.
    """
    s = settings_for()
    publisher, subscriber = clients
    publisher.create_topic(name=topic_path(s))
    subscriber.create_subscription(
        request=ps.Subscription(
            name=sub_path(s),
            topic=topic_path(s),
            ack_deadline_seconds=20,
            enable_message_ordering=True,
            message_retention_duration=duration_pb2.Duration(seconds=3600),
            expiration_policy=ps.ExpirationPolicy(ttl=duration_pb2.Duration(seconds=31 * 86400)),
        )
    )

    report = prov.provision_pubsub(s)
    assert "updated (ack_deadline_seconds, message_retention_duration, expiration_policy)" in actions_for(
        report, sub_path(s)
    ), str(report)
    sub = subscriber.get_subscription(subscription=sub_path(s))
    assert never_expires(sub)
    assert sub.ack_deadline_seconds == 30
    assert sub.message_retention_duration == timedelta(days=7)

    undone = {step.what: step for step in report.manual}
    dlp = undone[f"update dead_letter_policy of {sub_path(s)}"]
    assert dlp.reason.startswith("InvalidArgument")
    assert dlp.commands == [
        f"gcloud pubsub subscriptions update {s.pubsub_subscription} --project=test-project "
        f"--dead-letter-topic={s.pubsub_topic}-dead-letter --max-delivery-attempts=100"
    ]
    assert undone[f"update retry_policy of {sub_path(s)}"].commands == [
        f"gcloud pubsub subscriptions update {s.pubsub_subscription} --project=test-project "
        "--min-retry-delay=10s --max-retry-delay=600s"
    ]
    assert "NOT DONE" in str(report) and dlp.commands[0] in str(report)

    again = prov.provision_pubsub(s)
    assert not again.changed
    assert actions_for(again, sub_path(s)) == [
        "differs (enable_exactly_once_delivery)", "differs (dead_letter_policy)", "differs (retry_policy)",
    ]


@emulator
def test_subscription_without_ordering_is_reported_not_changed(pubsub_emulator, clients):
    s = settings_for()
    publisher, subscriber = clients
    publisher.create_topic(name=topic_path(s))
    subscriber.create_subscription(
        request=ps.Subscription(name=sub_path(s), topic=topic_path(s), ack_deadline_seconds=30)
    )
    report = prov.provision_pubsub(s)
    assert "differs (enable_message_ordering)" in actions_for(report, sub_path(s))
    step = next(m for m in report.manual if m.what == f"message ordering on {sub_path(s)}")
    assert step.commands[0] == f"gcloud pubsub subscriptions delete {s.pubsub_subscription} --project=test-project"
    assert subscriber.get_subscription(subscription=sub_path(s)).enable_message_ordering is False


@emulator
def test_subscription_on_another_topic_is_an_error(pubsub_emulator, clients):
    s = settings_for()
    publisher, subscriber = clients
    other = f"{PROJECT}/topics/other-{uuid.uuid4().hex[:8]}"
    publisher.create_topic(name=other)
    subscriber.create_subscription(request={"name": sub_path(s), "topic": other, "ack_deadline_seconds": 30})
    with pytest.raises(prov.ProvisioningError, match="exists on topic"):
        prov.provision_pubsub(s)


@emulator
def test_service_agent_grant_refused_by_the_emulator_prints_the_gcloud_commands(pubsub_emulator):
    s = settings_for(gcp_project_number=123456789012)
    report = prov.provision_pubsub(s)
    agent = "service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert "not granted (roles/pubsub.publisher)" in actions_for(report, topic_path(s, "-dead-letter"))
    assert "not granted (roles/pubsub.subscriber)" in actions_for(report, sub_path(s))
    commands = [c for step in report.manual for c in step.commands]
    assert commands == [
        f"gcloud pubsub topics add-iam-policy-binding {s.pubsub_topic}-dead-letter --project=test-project "
        f'--member="serviceAccount:{agent}" --role=roles/pubsub.publisher',
        f"gcloud pubsub subscriptions add-iam-policy-binding {s.pubsub_subscription} --project=test-project "
        f'--member="serviceAccount:{agent}" --role=roles/pubsub.subscriber',
    ]
    assert all(step.reason.startswith("MethodNotImplemented") for step in report.manual)


@emulator
def test_without_project_number_the_grant_commands_look_it_up(pubsub_emulator):
    s = settings_for()
    report = prov.provision_pubsub(s)
    [step] = report.manual
    assert "GCP_PROJECT_NUMBER" in step.reason
    lookup = "service-$(gcloud projects describe test-project --format='value(projectNumber)')@gcp-sa-pubsub"
    assert len(step.commands) == 2 and all(lookup in c for c in step.commands)
    assert "roles/pubsub.publisher" in step.commands[0] and "roles/pubsub.subscriber" in step.commands[1]


@emulator
def test_dataset_is_created_in_the_configured_location(bigquery_host):
    from app.warehouse.bigquery import make_bigquery_client

    s = settings_for(bigquery_host, bigquery_location="EU")
    report = prov.provision_bigquery(s)
    assert report.lines == [
        (f"bigquery dataset test-project.{s.bigquery_dataset}", "created (in EU)"),
        (f"bigquery table test-project.{s.bigquery_dataset}._ingest_receipts", "created"),  # the API writes it
    ]
    client = make_bigquery_client(s)
    try:
        assert client.get_dataset(f"test-project.{s.bigquery_dataset}").location == "EU"
    finally:
        client.close()
    assert not prov.provision_bigquery(s).changed


@emulator
def test_dataset_in_another_location_is_reported(bigquery_host):
    s = settings_for(bigquery_host, bigquery_location="EU")
    prov.provision_bigquery(s)
    report = prov.provision_bigquery(s.model_copy(update={"bigquery_location": "US"}))
    assert ("bigquery dataset test-project." + s.bigquery_dataset, "differs (location EU)") in report.lines
    [step] = report.manual
    assert "BIGQUERY_LOCATION is US" in step.reason and step.commands == ["export BIGQUERY_LOCATION=EU"]


def script_env(pubsub_emulator: str, bigquery_host: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "BIGQUERY_", "PROVISION_", "GCP_"))}
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


@emulator
def test_pubsub_sh_twice(pubsub_emulator, bigquery_host):
    env = script_env(pubsub_emulator, bigquery_host, GCP_PROJECT_NUMBER="42")
    outputs = []
    for _ in range(2):
        proc = subprocess.run(["bash", "pubsub.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    assert "done: changes made; 2 step(s) left for you" in outputs[0]
    assert f"projects/test-project/subscriptions/{env['PUBSUB_SUBSCRIPTION']}" in outputs[0]
    assert "done: nothing to change; 2 step(s) left for you" in outputs[1]
    assert "created" not in outputs[1]
    for out in outputs:
        assert "NOT DONE (2)" in out
        assert (
            f"gcloud pubsub topics add-iam-policy-binding {env['PUBSUB_TOPIC']}-dead-letter --project=test-project "
            '--member="serviceAccount:service-42@gcp-sa-pubsub.iam.gserviceaccount.com" --role=roles/pubsub.publisher'
        ) in out


@emulator
def test_pubsub_sh_no_bigquery_flag(pubsub_emulator):
    env = script_env(pubsub_emulator, None)
    env.pop("PROVISION_BIGQUERY")
    proc = subprocess.run(
        ["bash", "pubsub.sh", "--no-bigquery"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BigQuery" not in proc.stdout and "bigquery dataset" not in proc.stdout


# --------------------------------------------------------------------------- no emulator


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
    raise gexc.ServiceUnavailable("emulator down")


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "app.provision", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and "--no-bigquery" in proc.stdout


@pytest.mark.parametrize(("configured", "expected"), [(1, 10), (30, 30), (5000, 600)])
def test_ack_deadline_is_clamped_to_pubsub_range(configured, expected):
    assert prov.subscription_ack_deadline(Settings(ack_deadline_seconds=configured)) == expected


def test_pubsub_max_delivery_attempts_defaults_high_and_stays_in_pubsub_range():
    assert Settings().pubsub_max_delivery_attempts == 100
    for bad in (4, 101):
        with pytest.raises(ValidationError, match="pubsub_max_delivery_attempts"):
            Settings(pubsub_max_delivery_attempts=bad)


def test_drifted_fields_compare_presence_as_well_as_value():
    s = settings_for()
    wanted = prov.main_subscription(s, prov.PubSubNames.of(s))
    same = ps.Subscription.deserialize(ps.Subscription.serialize(wanted))
    assert prov.drifted_fields(same, wanted) == []
    default_expiry = ps.Subscription.deserialize(ps.Subscription.serialize(wanted))
    default_expiry._pb.ClearField("expiration_policy")  # unset = 31-day default, not never
    assert prov.drifted_fields(default_expiry, wanted) == ["expiration_policy"]


# --------------------------------------------------------------------------- IAM with fakes


class FakeIamClient:
    """Holds IAM policies per resource like Pub/Sub's IAM methods, recording every set."""

    def __init__(self, policies: dict[str, policy_pb2.Policy] | None = None, fail: Exception | None = None):
        self.policies = policies or {}
        self.sets: list[tuple[str, policy_pb2.Policy]] = []
        self.fail = fail
        self.abort_next_set = 0

    def get_iam_policy(self, request):
        if self.fail:
            raise self.fail
        policy = policy_pb2.Policy()
        policy.CopyFrom(self.policies.get(request["resource"], policy_pb2.Policy(etag=b"0")))
        return policy

    def set_iam_policy(self, request):
        if self.abort_next_set:
            self.abort_next_set -= 1
            raise gexc.Aborted("etag mismatch")
        policy = policy_pb2.Policy()
        policy.CopyFrom(request["policy"])
        self.sets.append((request["resource"], policy))
        self.policies[request["resource"]] = policy
        return policy


def members(policy: policy_pb2.Policy, role: str) -> list[str]:
    return [m for b in policy.bindings if b.role == role and not b.HasField("condition") for m in b.members]


def test_add_iam_binding_adds_the_member_once_and_keeps_other_bindings():
    existing = policy_pb2.Policy(
        etag=b"7",
        bindings=[
            policy_pb2.Binding(role="roles/pubsub.publisher", members=["user:alice@example.com"]),
            policy_pb2.Binding(role="roles/pubsub.viewer", members=["group:ops@example.com"]),
        ],
    )
    client = FakeIamClient({"t": existing})
    assert prov.add_iam_binding(client, "t", "roles/pubsub.publisher", "serviceAccount:sa@x") is True
    [(resource, policy)] = client.sets
    assert resource == "t" and policy.etag == b"7"  # the etag read is sent back
    assert members(policy, "roles/pubsub.publisher") == ["user:alice@example.com", "serviceAccount:sa@x"]
    assert members(policy, "roles/pubsub.viewer") == ["group:ops@example.com"]

    assert prov.add_iam_binding(client, "t", "roles/pubsub.publisher", "serviceAccount:sa@x") is False
    assert len(client.sets) == 1


def test_add_iam_binding_ignores_a_conditional_binding_of_the_same_role():
    from google.type import expr_pb2

    conditional = policy_pb2.Binding(
        role="roles/pubsub.subscriber", members=["serviceAccount:sa@x"], condition=expr_pb2.Expr(expression="false")
    )
    client = FakeIamClient({"s": policy_pb2.Policy(version=3, bindings=[conditional])})
    assert prov.add_iam_binding(client, "s", "roles/pubsub.subscriber", "serviceAccount:sa@x") is True
    assert members(client.sets[0][1], "roles/pubsub.subscriber") == ["serviceAccount:sa@x"]
    assert len(client.sets[0][1].bindings) == 2


def test_add_iam_binding_rereads_after_a_concurrent_change():
    client = FakeIamClient()
    client.abort_next_set = 1
    assert prov.add_iam_binding(client, "t", "roles/pubsub.publisher", "serviceAccount:sa@x") is True
    assert members(client.policies["t"], "roles/pubsub.publisher") == ["serviceAccount:sa@x"]


def provisioner(settings: Settings, publisher, subscriber) -> prov.PubSubProvisioner:
    return prov.PubSubProvisioner(settings, publisher, subscriber, prov.Report())


def test_service_agent_gets_publisher_on_dead_letter_topic_and_subscriber_on_subscription():
    s = settings_for(gcp_project_number=987654321)
    publisher, subscriber = FakeIamClient(), FakeIamClient()
    p = provisioner(s, publisher, subscriber)
    p.grant_service_agent()
    agent = "serviceAccount:service-987654321@gcp-sa-pubsub.iam.gserviceaccount.com"
    [(topic, topic_policy)] = publisher.sets
    assert topic == topic_path(s, "-dead-letter")
    assert members(topic_policy, "roles/pubsub.publisher") == [agent]
    [(sub, sub_policy)] = subscriber.sets
    assert sub == sub_path(s)
    assert members(sub_policy, "roles/pubsub.subscriber") == [agent]
    assert p.report.changed and p.report.manual == []

    again = provisioner(s, publisher, subscriber)
    again.grant_service_agent()
    assert not again.report.changed and len(publisher.sets) == len(subscriber.sets) == 1
    assert actions_for(again.report, sub) == ["has (roles/pubsub.subscriber)"]


def test_permission_denied_grant_is_reported_with_its_command():
    s = settings_for(gcp_project_number=5)
    publisher = FakeIamClient(fail=gexc.PermissionDenied("caller lacks pubsub.topics.getIamPolicy"))
    subscriber = FakeIamClient()
    p = provisioner(s, publisher, subscriber)
    p.grant_service_agent()
    [step] = p.report.manual
    assert step.reason == "PermissionDenied: caller lacks pubsub.topics.getIamPolicy"
    assert step.commands == [
        f"gcloud pubsub topics add-iam-policy-binding {s.pubsub_topic}-dead-letter --project=test-project "
        '--member="serviceAccount:service-5@gcp-sa-pubsub.iam.gserviceaccount.com" --role=roles/pubsub.publisher'
    ]
    assert len(subscriber.sets) == 1  # the other grant still happened


def test_add_iam_binding_gives_up_after_repeated_concurrent_changes():
    client = FakeIamClient()
    client.abort_next_set = prov.IAM_SET_ATTEMPTS
    with pytest.raises(gexc.Aborted):
        prov.add_iam_binding(client, "t", "roles/pubsub.publisher", "serviceAccount:sa@x")
    assert client.sets == []
