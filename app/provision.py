"""Idempotent provisioning of the Google Cloud resources (what `pubsub.sh` runs).

Creates, if missing:
- the topic `PUBSUB_TOPIC`;
- the dead-letter topic `<topic>-dead-letter` and its subscription
  `<subscription>-dead-letter` (so dead-lettered messages are kept and can be inspected);
- the subscription `PUBSUB_SUBSCRIPTION` with an explicit ack deadline, message ordering,
  a dead-letter policy (`MAX_DELIVERY_ATTEMPTS` clamped to Pub/Sub's 5..100) and a retry
  policy (exponential backoff between nacks);
- the BigQuery dataset `BIGQUERY_DATASET` (skip with `PROVISION_BIGQUERY=false`).

Existing resources are left alone, except that safe-to-change subscription fields (ack
deadline, dead-letter and retry policies) are updated when they differ. Message ordering
cannot be changed on an existing subscription: a mismatch is reported, not fixed.

Works against Google Cloud (Application Default Credentials; `GCP_PROJECT`) and against
emulators (`PUBSUB_EMULATOR_HOST`, `BIGQUERY_EMULATOR_HOST`).

Note: on Google Cloud, dead-lettering also needs the Pub/Sub service account
(`service-<project-number>@gcp-sa-pubsub.iam.gserviceaccount.com`) to have
`roles/pubsub.publisher` on the dead-letter topic and `roles/pubsub.subscriber` on the
subscription; this module does not change IAM (see `pubsub.sh`'s usage note).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from app.broker.pubsub import DEAD_LETTER_SUFFIX
from app.settings import Settings

SUBSCRIPTION_ACK_DEADLINE_MIN = 10
SUBSCRIPTION_ACK_DEADLINE_MAX = 600
MIN_DELIVERY_ATTEMPTS = 5
MAX_DELIVERY_ATTEMPTS = 100
RETRY_MIN_BACKOFF_SECONDS = 10
RETRY_MAX_BACKOFF_SECONDS = 600


@dataclass
class Report:
    """What provisioning did: one (resource, action) line per step."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, resource: str, action: str) -> None:
        self.lines.append((resource, action))

    @property
    def changed(self) -> bool:
        return any(action.startswith(("created", "updated")) for _, action in self.lines)

    def __str__(self) -> str:
        return "\n".join(f"{action:>10}  {resource}" for resource, action in self.lines)


def subscription_ack_deadline(settings: Settings) -> int:
    """The subscription's ack deadline: ACK_DEADLINE_SECONDS within Pub/Sub's 10..600 s."""
    seconds = round(settings.ack_deadline_seconds)
    return int(min(max(seconds, SUBSCRIPTION_ACK_DEADLINE_MIN), SUBSCRIPTION_ACK_DEADLINE_MAX))


def delivery_attempts(settings: Settings) -> int:
    return min(max(settings.max_delivery_attempts, MIN_DELIVERY_ATTEMPTS), MAX_DELIVERY_ATTEMPTS)


def dead_letter_topic_name(settings: Settings) -> str:
    return f"{settings.pubsub_topic}{DEAD_LETTER_SUFFIX}"


def dead_letter_subscription_name(settings: Settings) -> str:
    return f"{settings.pubsub_subscription}{DEAD_LETTER_SUFFIX}"


def _already_exists(call: Callable[[], Any]) -> bool:
    """Run a create call; True if it created, False if the resource already existed."""
    from google.api_core import exceptions as gexc

    try:
        call()
        return True
    except gexc.AlreadyExists:
        return False


def provision_pubsub(settings: Settings, report: Report | None = None) -> Report:
    from google.protobuf import duration_pb2, field_mask_pb2
    from google.pubsub_v1 import types as ps

    from app.broker.pubsub import make_publisher, make_subscriber

    report = report or Report()
    project = settings.gcp_project
    topic = f"projects/{project}/topics/{settings.pubsub_topic}"
    dl_topic = f"projects/{project}/topics/{dead_letter_topic_name(settings)}"
    sub_name = f"projects/{project}/subscriptions/{settings.pubsub_subscription}"
    dl_sub_name = f"projects/{project}/subscriptions/{dead_letter_subscription_name(settings)}"

    publisher = make_publisher(settings, ordering=False)
    subscriber = make_subscriber(settings)
    try:
        for name in (topic, dl_topic):
            created = _already_exists(lambda name=name: publisher.create_topic(request={"name": name}))
            report.add(name, "created" if created else "exists")

        created = _already_exists(
            lambda: subscriber.create_subscription(
                request={
                    "name": dl_sub_name,
                    "topic": dl_topic,
                    "ack_deadline_seconds": 60,
                    "message_retention_duration": duration_pb2.Duration(seconds=7 * 24 * 3600),
                }
            )
        )
        report.add(dl_sub_name, "created" if created else "exists")

        wanted = ps.Subscription(
            name=sub_name,
            topic=topic,
            ack_deadline_seconds=subscription_ack_deadline(settings),
            enable_message_ordering=True,
            dead_letter_policy=ps.DeadLetterPolicy(
                dead_letter_topic=dl_topic, max_delivery_attempts=delivery_attempts(settings)
            ),
            retry_policy=ps.RetryPolicy(
                minimum_backoff=duration_pb2.Duration(seconds=RETRY_MIN_BACKOFF_SECONDS),
                maximum_backoff=duration_pb2.Duration(seconds=RETRY_MAX_BACKOFF_SECONDS),
            ),
        )
        if _already_exists(lambda: subscriber.create_subscription(request=wanted)):
            report.add(sub_name, "created")
            return report

        current = subscriber.get_subscription(request={"subscription": sub_name})
        if current.topic != topic:
            raise SystemExit(f"subscription {sub_name} exists on topic {current.topic}, not {topic}")
        if not current.enable_message_ordering:
            report.add(sub_name, "warning: exists without message ordering (cannot be changed; recreate it)")
        paths = []
        if current.ack_deadline_seconds != wanted.ack_deadline_seconds:
            paths.append("ack_deadline_seconds")
        if current.dead_letter_policy != wanted.dead_letter_policy:
            paths.append("dead_letter_policy")
        if current.retry_policy != wanted.retry_policy:
            paths.append("retry_policy")
        if not paths:
            report.add(sub_name, "exists")
            return report
        try:
            subscriber.update_subscription(
                request={"subscription": wanted, "update_mask": field_mask_pb2.FieldMask(paths=paths)}
            )
            report.add(sub_name, f"updated ({', '.join(paths)})")
        except Exception as exc:  # e.g. an emulator that cannot update these fields
            report.add(sub_name, f"warning: exists, differs in {', '.join(paths)}, update failed: {exc}")
        return report
    finally:
        for client in (publisher, subscriber):
            try:
                client.transport.close() if client is publisher else client.close()
            except Exception:
                pass


def provision_bigquery(settings: Settings, report: Report | None = None) -> Report:
    """Create the dataset (ok if it exists) with the warehouse's own client setup."""
    from app.warehouse.bigquery import ensure_dataset

    report = report or Report()
    created = ensure_dataset(settings)
    report.add(f"bigquery dataset {settings.gcp_project}.{settings.bigquery_dataset}", "created" if created else "exists")
    return report


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
    print("done: " + ("changes made" if report.changed else "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
