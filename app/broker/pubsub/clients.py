"""Pub/Sub client construction and the permission probe used for readiness.

- Emulator: `PUBSUB_EMULATOR_HOST=host:port` (env, or a `pubsub_emulator_host` setting)
  switches both clients to an insecure channel with anonymous credentials.
- `PUBSUB_ENDPOINT` (e.g. `us-east1-pubsub.googleapis.com:443`) pins both clients to a
  locational endpoint. Ordering holds only for messages published in one region, so a
  publisher that may run in several regions should pin one:
  https://cloud.google.com/pubsub/docs/ordering and
  https://cloud.google.com/pubsub/docs/reference/service_apis_overview#pubsub_endpoints
"""

from __future__ import annotations

import os
from typing import Any

from app.settings import Settings

# Pub/Sub limits: a publish request holds at most 1000 messages and 10 MB.
# https://cloud.google.com/pubsub/quotas#resource_limits
BATCH_MAX_MESSAGES = 1000
BATCH_MAX_BYTES = 9 * 1024 * 1024
BATCH_MAX_LATENCY = 0.01  # seconds
# Publisher flow control: messages/bytes waiting to be published, across all requests.
FLOW_MAX_MESSAGES = 10_000
FLOW_MAX_BYTES = 256 * 1024 * 1024
READY_TIMEOUT = 3.0

# Suffix of the dead-letter topic and its subscription (provisioned by app.provision).
DEAD_LETTER_SUFFIX = "-dead-letter"


def emulator_host(settings: Settings) -> str | None:
    """The Pub/Sub emulator's host:port, from Settings (if it has the field) or the env."""
    return getattr(settings, "pubsub_emulator_host", None) or os.environ.get("PUBSUB_EMULATOR_HOST") or None


def client_kwargs(settings: Settings, transport_cls: Any) -> dict[str, Any]:
    """Extra client arguments: an insecure channel to the emulator, or a locational endpoint.

    The library already switches to the emulator when PUBSUB_EMULATOR_HOST is in the
    environment; doing it here too covers a host that only comes from Settings.
    """
    host = emulator_host(settings)
    if host:
        import grpc

        return {"transport": transport_cls(channel=grpc.insecure_channel(host))}
    if settings.pubsub_endpoint:
        return {"client_options": {"api_endpoint": settings.pubsub_endpoint}}
    return {}


def make_publisher(settings: Settings, *, ordering: bool | None = None):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    types = pubsub_v1.types
    return pubsub_v1.PublisherClient(
        batch_settings=types.BatchSettings(
            max_bytes=BATCH_MAX_BYTES, max_latency=BATCH_MAX_LATENCY, max_messages=BATCH_MAX_MESSAGES
        ),
        publisher_options=types.PublisherOptions(
            enable_message_ordering=settings.pubsub_ordering if ordering is None else ordering,
            flow_control=types.PublishFlowControl(
                message_limit=FLOW_MAX_MESSAGES,
                byte_limit=FLOW_MAX_BYTES,
                limit_exceeded_behavior=types.LimitExceededBehavior.ERROR,
            ),
        ),
        **client_kwargs(settings, PublisherGrpcTransport),
    )


def make_subscriber(settings: Settings):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(**client_kwargs(settings, SubscriberGrpcTransport))


def probe_permission(client: Any, resource: str, permission: str, fallback_get: Any) -> tuple[bool, str]:
    """(ready, reason) from TestIamPermissions, which needs no permission of its own.

    roles/pubsub.publisher and roles/pubsub.subscriber grant no `get` on topics or
    subscriptions, so readiness asks IAM which of the permissions the process needs it
    holds. For a missing resource IAM answers an empty set, not NOT_FOUND
    (https://cloud.google.com/iam/docs/reference/rest/v1/permissions/testIamPermissions
    and the google.iam.v1 TestIamPermissions contract). Emulators do not implement IAM:
    there `fallback_get` (a metadata get) is used. PermissionDenied anywhere means we
    cannot tell: ready, with a note.
    """
    from google.api_core import exceptions as gexc

    try:
        try:
            answer = client.test_iam_permissions(
                request={"resource": resource, "permissions": [permission]}, timeout=READY_TIMEOUT, retry=None
            )
        except gexc.MethodNotImplemented:
            fallback_get()
            return True, "ok"
    except gexc.PermissionDenied as exc:
        return True, f"unknown: not allowed to check {resource} ({exc.message})"
    except gexc.NotFound:
        return False, f"{resource} does not exist"
    except Exception as exc:
        return False, f"pubsub {resource} unreachable: {type(exc).__name__}: {exc}"
    if permission in answer.permissions:
        return True, "ok"
    return False, f"{resource} does not exist or this identity lacks {permission}"
