"""Idempotent provisioning of the Google Cloud resources (what `pubsub.sh` runs).

Brings these to the wanted state, creating what is missing:
- the topic `PUBSUB_TOPIC` and the dead-letter topic `<topic>-dead-letter`;
- the dead-letter subscription `<subscription>-dead-letter`: never expires, keeps
  messages 7 days (Pub/Sub's maximum), so dead letters wait there to be listed/replayed;
- the subscription `PUBSUB_SUBSCRIPTION`: never expires, message ordering, exactly-once
  delivery (so acks and lease extensions report per message whether they held), ack deadline,
  retry policy (exponential backoff between redeliveries) and a dead-letter policy with
  `PUBSUB_MAX_DELIVERY_ATTEMPTS` (default 100, Pub/Sub's maximum, so an outage does not
  dead-letter healthy messages);
- the Pub/Sub service agent's roles for dead-lettering: publisher on the dead-letter
  topic, subscriber on the subscription (needs `GCP_PROJECT_NUMBER`);
- the BigQuery dataset `BIGQUERY_DATASET` in `BIGQUERY_LOCATION`
  (skip with `PROVISION_BIGQUERY=false`).

An existing subscription that differs in an updatable field is updated in place
(`UpdateSubscription` with a field mask). What cannot be changed (message ordering, a
dataset's location) or could not be done (an IAM grant refused or unimplemented) is
reported with the exact `gcloud` command to run, never silently skipped.

Works against Google Cloud (Application Default Credentials; `GCP_PROJECT`) and against
emulators (`PUBSUB_EMULATOR_HOST`, `BIGQUERY_EMULATOR_HOST`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from app.broker.pubsub import DEAD_LETTER_SUFFIX
from app.settings import Settings

SUBSCRIPTION_ACK_DEADLINE_MIN = 10
SUBSCRIPTION_ACK_DEADLINE_MAX = 600
DEAD_LETTER_ACK_DEADLINE_SECONDS = 60
RETRY_MIN_BACKOFF_SECONDS = 10
RETRY_MAX_BACKOFF_SECONDS = 600
# Pub/Sub's maximum subscription retention:
# https://cloud.google.com/pubsub/docs/subscription-properties#message_retention_duration
MESSAGE_RETENTION_SECONDS = 7 * 24 * 3600
# Fields UpdateSubscription accepts that provisioning manages; enable_message_ordering is
# not among them (fixed at creation). Scalars are compared by value, messages by presence too.
SCALAR_FIELDS = ("ack_deadline_seconds", "enable_exactly_once_delivery")
UPDATABLE_FIELDS = (
    "ack_deadline_seconds",
    "enable_exactly_once_delivery",
    "message_retention_duration",
    "expiration_policy",
    "dead_letter_policy",
    "retry_policy",
)
# https://cloud.google.com/pubsub/docs/handling-failures#grant_forwarding_permissions
PUBLISHER_ROLE = "roles/pubsub.publisher"
SUBSCRIBER_ROLE = "roles/pubsub.subscriber"
IAM_SET_ATTEMPTS = 3  # read-modify-write retries when the policy's etag moved under us


class ProvisioningError(RuntimeError):
    """A conflict provisioning must not paper over (e.g. a subscription on another topic)."""


@dataclass
class ManualStep:
    """Something provisioning could not do, why, and the commands that do it."""

    what: str
    reason: str
    commands: list[str]


@dataclass
class Report:
    """What provisioning did: one (resource, action) line per step, plus steps left to do."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    manual: list[ManualStep] = field(default_factory=list)

    def add(self, resource: str, action: str) -> None:
        self.lines.append((resource, action))

    def todo(self, what: str, reason: str, commands: list[str]) -> None:
        self.manual.append(ManualStep(what, reason, commands))

    @property
    def changed(self) -> bool:
        return any(action.startswith(("created", "updated", "granted")) for _, action in self.lines)

    def __str__(self) -> str:
        out = [f"{action:>10}  {resource}" for resource, action in self.lines]
        if self.manual:
            out.append("")
            out.append(f"NOT DONE ({len(self.manual)}): run these yourself")
            for step in self.manual:
                out.append(f"- {step.what}: {step.reason}")
                out.extend(f"    {command}" for command in step.commands)
        return "\n".join(out)


@dataclass(frozen=True)
class PubSubNames:
    """Full resource names of the topics and subscriptions, from Settings."""

    project: str
    topic: str
    dead_letter_topic: str
    subscription: str
    dead_letter_subscription: str

    @classmethod
    def of(cls, settings: Settings) -> "PubSubNames":
        p = settings.gcp_project
        return cls(
            project=p,
            topic=f"projects/{p}/topics/{settings.pubsub_topic}",
            dead_letter_topic=f"projects/{p}/topics/{settings.pubsub_topic}{DEAD_LETTER_SUFFIX}",
            subscription=f"projects/{p}/subscriptions/{settings.pubsub_subscription}",
            dead_letter_subscription=f"projects/{p}/subscriptions/{settings.pubsub_subscription}{DEAD_LETTER_SUFFIX}",
        )


def subscription_ack_deadline(settings: Settings) -> int:
    """The subscription's ack deadline: ACK_DEADLINE_SECONDS within Pub/Sub's 10..600 s."""
    seconds = round(settings.ack_deadline_seconds)
    return int(min(max(seconds, SUBSCRIPTION_ACK_DEADLINE_MIN), SUBSCRIPTION_ACK_DEADLINE_MAX))


def pubsub_service_agent(project_number: int | str) -> str:
    return f"service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def _seconds(value: int) -> Any:
    from google.protobuf import duration_pb2

    return duration_pb2.Duration(seconds=value)


def _never_expires() -> Any:
    # Set but without ttl = never expires; unset would mean the 31-day default.
    # https://cloud.google.com/pubsub/docs/subscription-properties#expiration_period
    from google.pubsub_v1 import types as ps

    return ps.ExpirationPolicy()


def main_subscription(settings: Settings, names: PubSubNames) -> Any:
    from google.pubsub_v1 import types as ps

    return ps.Subscription(
        name=names.subscription,
        topic=names.topic,
        ack_deadline_seconds=subscription_ack_deadline(settings),
        enable_message_ordering=True,
        # Without it Pub/Sub may redeliver a message before its ack deadline and an ack
        # may silently not hold; with it, neither happens and a failed ack or lease
        # extension says so per ack id:
        # https://cloud.google.com/pubsub/docs/exactly-once-delivery
        enable_exactly_once_delivery=True,
        message_retention_duration=_seconds(MESSAGE_RETENTION_SECONDS),
        expiration_policy=_never_expires(),
        dead_letter_policy=ps.DeadLetterPolicy(
            dead_letter_topic=names.dead_letter_topic,
            max_delivery_attempts=settings.pubsub_max_delivery_attempts,
        ),
        retry_policy=ps.RetryPolicy(
            minimum_backoff=_seconds(RETRY_MIN_BACKOFF_SECONDS),
            maximum_backoff=_seconds(RETRY_MAX_BACKOFF_SECONDS),
        ),
    )


def dead_letter_subscription(names: PubSubNames) -> Any:
    from google.pubsub_v1 import types as ps

    return ps.Subscription(
        name=names.dead_letter_subscription,
        topic=names.dead_letter_topic,
        ack_deadline_seconds=DEAD_LETTER_ACK_DEADLINE_SECONDS,
        message_retention_duration=_seconds(MESSAGE_RETENTION_SECONDS),
        expiration_policy=_never_expires(),
    )


def drifted_fields(current: Any, wanted: Any) -> list[str]:
    """Updatable fields the wanted subscription sets whose value differs on the server."""
    cur, want = current._pb, wanted._pb
    paths = []
    for name in UPDATABLE_FIELDS:
        if name in SCALAR_FIELDS:
            if getattr(cur, name) != getattr(want, name):
                paths.append(name)
        elif want.HasField(name) and (not cur.HasField(name) or getattr(cur, name) != getattr(want, name)):
            paths.append(name)
    return paths


def add_iam_binding(client: Any, resource: str, role: str, member: str) -> bool:
    """Grant `role` on `resource` to `member` unless it has it; True when the policy changed.

    Read-modify-write of the resource's IAM policy: the policy read carries an etag, so a
    concurrent change makes set_iam_policy fail with ABORTED and we read again.
    """
    from google.api_core import exceptions as gexc

    for _ in range(IAM_SET_ATTEMPTS - 1):
        try:
            return _add_iam_binding_once(client, resource, role, member)
        except gexc.Aborted:
            continue
    return _add_iam_binding_once(client, resource, role, member)


def _add_iam_binding_once(client: Any, resource: str, role: str, member: str) -> bool:
    policy = client.get_iam_policy(request={"resource": resource})
    unconditional = [b for b in policy.bindings if b.role == role and not b.HasField("condition")]
    if any(member in b.members for b in unconditional):
        return False
    if unconditional:
        unconditional[0].members.append(member)
    else:
        policy.bindings.add(role=role, members=[member])
    client.set_iam_policy(request={"resource": resource, "policy": policy})
    return True


def _short(resource: str) -> str:
    return resource.rsplit("/", 1)[-1]


def _call_error(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}"


class PubSubProvisioner:
    """Brings topics, subscriptions and the service agent's grants to the wanted state."""

    def __init__(self, settings: Settings, publisher: Any, subscriber: Any, report: Report) -> None:
        self.settings = settings
        self.names = PubSubNames.of(settings)
        self.publisher = publisher
        self.subscriber = subscriber
        self.report = report

    def run(self) -> None:
        self.ensure_topic(self.names.topic)
        self.ensure_topic(self.names.dead_letter_topic)
        self.ensure_subscription(dead_letter_subscription(self.names))
        self.ensure_subscription(main_subscription(self.settings, self.names))
        self.grant_service_agent()

    # ------------------------------------------------------------------ topics
    def ensure_topic(self, name: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.publisher.create_topic(request={"name": name})
            self.report.add(name, "created")
        except gexc.AlreadyExists:
            self.report.add(name, "exists")

    # ------------------------------------------------------------------ subscriptions
    def ensure_subscription(self, wanted: Any) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.subscriber.create_subscription(request=wanted)
            self.report.add(wanted.name, "created")
            return
        except gexc.AlreadyExists:
            pass
        current = self.subscriber.get_subscription(request={"subscription": wanted.name})
        if current.topic != wanted.topic:
            raise ProvisioningError(f"subscription {wanted.name} exists on topic {current.topic}, not {wanted.topic}")
        if current.enable_message_ordering != wanted.enable_message_ordering:
            self.report_ordering_mismatch(wanted)
        paths = drifted_fields(current, wanted)
        if not paths:
            self.report.add(wanted.name, "exists")
            return
        self.update_subscription(wanted, paths)

    def update_subscription(self, wanted: Any, paths: list[str]) -> None:
        """One update with all drifted fields; if refused, each field alone, reporting the rest."""
        from google.api_core import exceptions as gexc

        try:
            self._update(wanted, paths)
            self.report.add(wanted.name, f"updated ({', '.join(paths)})")
            return
        except gexc.GoogleAPICallError:
            pass
        done, failed = [], []
        for path in paths:
            try:
                self._update(wanted, [path])
                done.append(path)
            except gexc.GoogleAPICallError as exc:
                failed.append((path, exc))
        if done:
            self.report.add(wanted.name, f"updated ({', '.join(done)})")
        for path, exc in failed:
            self.report.add(wanted.name, f"differs ({path})")
            self.report.todo(
                f"update {path} of {wanted.name}",
                _call_error(exc),
                [self.update_command(wanted, path)],
            )

    def _update(self, wanted: Any, paths: list[str]) -> None:
        from google.protobuf import field_mask_pb2

        self.subscriber.update_subscription(
            request={"subscription": wanted, "update_mask": field_mask_pb2.FieldMask(paths=paths)}
        )

    def update_command(self, wanted: Any, path: str) -> str:
        sub = f"gcloud pubsub subscriptions update {_short(wanted.name)} --project={self.names.project}"
        flags = {
            "ack_deadline_seconds": f"--ack-deadline={wanted.ack_deadline_seconds}",
            "enable_exactly_once_delivery": "--enable-exactly-once-delivery",
            "message_retention_duration": f"--message-retention-duration={MESSAGE_RETENTION_SECONDS}s",
            "expiration_policy": "--expiration-period=never",
            "dead_letter_policy": (
                f"--dead-letter-topic={_short(wanted.dead_letter_policy.dead_letter_topic)}"
                f" --max-delivery-attempts={wanted.dead_letter_policy.max_delivery_attempts}"
            ),
            "retry_policy": (
                f"--min-retry-delay={RETRY_MIN_BACKOFF_SECONDS}s --max-retry-delay={RETRY_MAX_BACKOFF_SECONDS}s"
            ),
        }
        return f"{sub} {flags[path]}"

    def report_ordering_mismatch(self, wanted: Any) -> None:
        name = _short(wanted.name)
        self.report.add(wanted.name, "differs (enable_message_ordering)")
        self.report.todo(
            f"message ordering on {wanted.name}",
            "message ordering cannot be changed on an existing subscription; drain it (let the "
            "subscriber empty the backlog), delete it and run pubsub.sh again",
            [f"gcloud pubsub subscriptions delete {name} --project={self.names.project}", "bash pubsub.sh"],
        )

    # ------------------------------------------------------------------ IAM
    def grant_service_agent(self) -> None:
        """Give the Pub/Sub service agent what dead-lettering needs (or say how to)."""
        grants = [
            (self.publisher, "topics", self.names.dead_letter_topic, PUBLISHER_ROLE),
            (self.subscriber, "subscriptions", self.names.subscription, SUBSCRIBER_ROLE),
        ]
        number = self.settings.gcp_project_number
        if number is None:
            agent = (
                f"service-$(gcloud projects describe {self.names.project} "
                "--format='value(projectNumber)')@gcp-sa-pubsub.iam.gserviceaccount.com"
            )
            self.report.todo(
                "grant the Pub/Sub service agent its dead-lettering roles",
                "GCP_PROJECT_NUMBER is not set, so the service agent's name is unknown "
                "(set it to let pubsub.sh grant them)",
                [self.grant_command(kind, resource, role, agent) for _, kind, resource, role in grants],
            )
            return
        agent = pubsub_service_agent(number)
        for client, kind, resource, role in grants:
            self.grant(client, kind, resource, role, agent)

    def grant(self, client: Any, kind: str, resource: str, role: str, agent: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            changed = add_iam_binding(client, resource, role, f"serviceAccount:{agent}")
        except gexc.GoogleAPICallError as exc:
            self.report.add(resource, f"not granted ({role})")
            self.report.todo(
                f"grant {role} on {resource} to {agent}",
                _call_error(exc),
                [self.grant_command(kind, resource, role, agent)],
            )
            return
        self.report.add(resource, f"granted ({role} to the Pub/Sub service agent)" if changed else f"has ({role})")

    def grant_command(self, kind: str, resource: str, role: str, agent: str) -> str:
        return (
            f"gcloud pubsub {kind} add-iam-policy-binding {_short(resource)} --project={self.names.project} "
            f'--member="serviceAccount:{agent}" --role={role}'
        )


def provision_pubsub(settings: Settings, report: Report | None = None) -> Report:
    from app.broker.pubsub import make_publisher, make_subscriber

    report = report if report is not None else Report()
    publisher = make_publisher(settings, ordering=False)
    subscriber = make_subscriber(settings)
    try:
        PubSubProvisioner(settings, publisher, subscriber, report).run()
        return report
    finally:
        for close in (publisher.transport.close, subscriber.close):
            try:
                close()
            except Exception:
                pass


def provision_bigquery(settings: Settings, report: Report | None = None) -> Report:
    """Create the dataset in BIGQUERY_LOCATION (ok if it exists) and its receipts table;
    report a location mismatch."""
    from app.warehouse.bigquery import BigQueryClient
    from app.warehouse.bigquery.receipts import BigQueryReceiptStore

    report = report if report is not None else Report()
    name = f"{settings.gcp_project}.{settings.bigquery_dataset}"
    client = BigQueryClient(settings)  # the warehouse's own wrapper: its timeouts, retries, error translation
    try:
        created = client.create_dataset()
        dataset = client.get_dataset()
        location = dataset.location if dataset is not None else settings.bigquery_location
        report.add(f"bigquery dataset {name}", f"created (in {location})" if created else "exists")
        # A dataset's location is fixed at creation:
        # https://cloud.google.com/bigquery/docs/locations#specify_locations
        if (location or "").lower() != settings.bigquery_location.lower():
            report.add(f"bigquery dataset {name}", f"differs (location {location})")
            report.todo(
                f"location of bigquery dataset {name}",
                f"it is in {location}, BIGQUERY_LOCATION is {settings.bigquery_location}; a dataset "
                "cannot move: set BIGQUERY_LOCATION to its location, or choose another BIGQUERY_DATASET",
                [f"export BIGQUERY_LOCATION={location}"],
            )
        receipts = BigQueryReceiptStore(settings, client)
        # Made here, so the API needs no right to create tables (docs/google-cloud.md, roles).
        report.add(f"bigquery table {name}.{receipts.ref.table}", receipts.ensure_table())
        return report
    finally:
        client.close()


def _env_flag(name: str, default: bool = True) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in {"0", "false", "no", "off"}


def provision(settings: Settings, *, pubsub: bool = True, bigquery: bool = True) -> Report:
    report = Report()
    if pubsub:
        provision_pubsub(settings, report)
    if bigquery:
        provision_bigquery(settings, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.provision",
        description="Create the Pub/Sub topic, subscriptions and BigQuery dataset (idempotent).",
    )
    parser.add_argument(
        "--no-bigquery",
        action="store_true",
        help="skip the BigQuery dataset (also: PROVISION_BIGQUERY=false)",
    )
    parser.add_argument(
        "--no-pubsub", action="store_true", help="skip Pub/Sub (also: PROVISION_PUBSUB=false)"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    do_bq = not args.no_bigquery and _env_flag("PROVISION_BIGQUERY")
    do_ps = not args.no_pubsub and _env_flag("PROVISION_PUBSUB")
    target = []
    if do_ps:
        ps_host = os.environ.get("PUBSUB_EMULATOR_HOST")
        target.append(f"Pub/Sub {'emulator ' + ps_host if ps_host else 'Google Cloud'}")
    if do_bq:
        bq_host = settings.bigquery_emulator_host or os.environ.get("BIGQUERY_EMULATOR_HOST")
        target.append(f"BigQuery {'emulator ' + bq_host if bq_host else 'Google Cloud'}")
    print(f"provisioning project {settings.gcp_project!r} on {', '.join(target) or 'nothing'}")
    try:
        report = provision(settings, pubsub=do_ps, bigquery=do_bq)
    except Exception as exc:
        print(f"provisioning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report)
    summary = "changes made" if report.changed else "nothing to change"
    if report.manual:
        summary += f"; {len(report.manual)} step(s) left for you (NOT DONE above)"
    print("done: " + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
