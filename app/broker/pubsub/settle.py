"""What an Acknowledge or ModifyAckDeadline call did to each ack id.

With exactly-once delivery (https://cloud.google.com/pubsub/docs/exactly-once-delivery)
these calls fail for ack ids that expired or were superseded by a newer delivery: the
call ends INVALID_ARGUMENT with a `google.rpc.ErrorInfo` whose metadata maps each failed
ack id to `PERMANENT_FAILURE_*` or `TRANSIENT_FAILURE_*`; ack ids it does not name
succeeded. That is how Google's client libraries read it (google-cloud-pubsub's
`streaming_pull_manager._process_requests`; java-pubsub PR #1022). Without ErrorInfo,
the call's own status applies to every ack id: the library's temporary codes are
retried, anything else failed them all.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from prometheus_client import Counter

from app import metrics

log = logging.getLogger(__name__)

ATTEMPTS = 3  # transient failures of one ack id, before it counts as failed
RETRY_DELAY = 0.5  # seconds, doubled per attempt
# google-cloud-pubsub: _EXACTLY_ONCE_DELIVERY_TEMPORARY_RETRY_ERRORS
TRANSIENT_CODES = frozenset({"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNAVAILABLE"})

SETTLE_FAILURES = Counter(
    "pubsub_settle_failures_total",
    "Ack ids Pub/Sub refused: ack (the message comes back), lease (extension failed: the lease is lost), "
    "receipt (a new delivery no longer valid), nack.",
    ["op", "reason"],
    registry=metrics.SUBSCRIBER,
)


class CallFailed(Exception):
    """The whole call failed for a reason that is not about single ack ids (e.g. permission)."""


def per_ack_id_errors(exc: BaseException) -> dict[str, str] | None:
    """ack id -> error from the ErrorInfo of a failed call, None if it carries none."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    call = getattr(exc, "response", None)
    if call is None:
        return None
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return dict(info.metadata)
    return None


def _code_name(exc: BaseException) -> str:
    code = getattr(exc, "grpc_status_code", None)
    return code.name if code is not None else type(exc).__name__


def settle(op: str, call: Callable[[list[str]], Any], ack_ids: list[str]) -> dict[str, str]:
    """Run `call` on `ack_ids`, retrying what failed transiently; return {ack id: reason} of
    those Pub/Sub refused (counted under `op`). Raises CallFailed when the call failed as a
    whole (no per-ack-id errors): at once if not transient, else after `ATTEMPTS`."""
    failed: dict[str, str] = {}
    pending = list(ack_ids)
    delay = RETRY_DELAY
    for attempt in range(ATTEMPTS):
        if not pending:
            break
        try:
            call(pending)
            pending = []
            break
        except Exception as exc:
            errors = per_ack_id_errors(exc)
            if errors is None:
                if _code_name(exc) not in TRANSIENT_CODES or attempt + 1 == ATTEMPTS:
                    raise CallFailed(f"{op} of {len(pending)} ack id(s) failed: {exc!r}") from exc
                retry = pending
            else:
                retry = [a for a in pending if errors.get(a, "").startswith("TRANSIENT_")]
                for a in pending:
                    if a in errors and not errors[a].startswith("TRANSIENT_"):
                        failed[a] = errors[a]
                reason = "TRANSIENT_FAILURE"
            pending = retry
            if pending and attempt + 1 < ATTEMPTS:
                time.sleep(delay)
                delay *= 2
    for a in pending:
        failed[a] = reason
    for reason in set(failed.values()):
        SETTLE_FAILURES.labels(op, reason).inc(sum(1 for r in failed.values() if r == reason))
    return failed
