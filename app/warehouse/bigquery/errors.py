"""The ONE translation of BigQuery errors into the warehouse seam's errors.

Classification reads structured fields only: the HTTP status, the `reason` of each
ErrorProto in `errors[]` (https://cloud.google.com/bigquery/docs/error-messages), the
gRPC status code, and for the Storage Write API the `StorageError` code carried in an
AppendRows error status plus per-row errors. The one exception is Google's DML
concurrency errors, which are documented by their message only (their reason is the
generic `invalidQuery`); those phrases live in `DML_CONCURRENCY_PHRASES` below.

Transient (nothing committed by this call, retry later; never counted towards
dead-lettering): network errors, 408/429/5xx, quota / rate limits, backend errors,
the DML queue and concurrent-update errors, gRPC UNAVAILABLE & co., and a new column
that the Storage Write API does not see yet (`SchemaPendingError`).

Global (`WarehouseUnavailable`, transient, and the subscriber stops pulling until an
apply succeeds): the project or credentials may not do this at all: 401 / 403
`accessDenied` / `billingNotEnabled`, an API not enabled (ErrorInfo `SERVICE_DISABLED`),
gRPC PERMISSION_DENIED / UNAUTHENTICATED, credentials that cannot be refreshed. A 403
that carries a quota or rate-limit reason stays an ordinary transient error.
Anything else is terminal.
"""

from __future__ import annotations

from typing import Any, Iterable

import grpc
import requests
from google.api_core import exceptions as gexc
from google.auth.exceptions import RefreshError, TransportError
from google.cloud.bigquery_storage_v1 import types as storage_types
from google.cloud.bigquery_storage_v1.exceptions import StreamClosedError
from google.protobuf import any_pb2

from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError, WarehouseUnavailable

# ErrorProto reasons worth retrying (https://cloud.google.com/bigquery/docs/error-messages,
# https://cloud.google.com/bigquery/docs/troubleshoot-quotas): rateLimitExceeded is a
# short-term limit, quotaExceeded a longer one; both clear by waiting.
TRANSIENT_REASONS = frozenset(
    {
        "backendError",
        "internalError",
        "jobBackendError",
        "jobInternalError",
        "quotaExceeded",
        "rateLimitExceeded",
        "jobRateLimitExceeded",
    }
)
# insertAll per-row reasons that mean "this row was not written, send it again":
# `stopped` = refused only because another row of the request was invalid.
TRANSIENT_ROW_REASONS = frozenset({"backendError", "internalError", "timeout", "stopped"})

TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})

TRANSIENT_GRPC_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,  # AppendRowsStream reports a stream it could not open this way
    }
)

# Google documents these two DML concurrency errors by message only (HTTP 400, reason
# `invalidQuery`), so a stable phrase of each is matched here and nowhere else:
DML_CONCURRENCY_PHRASES: dict[str, str] = {
    # more than 20 mutating DML statements queued against one table
    "too many dml statements outstanding against table": (
        "https://cloud.google.com/bigquery/docs/data-manipulation-language#update_delete_merge_dml_concurrency"
    ),
    # two mutating DML statements touched the same partition at once
    "could not serialize access to table": (
        "https://cloud.google.com/bigquery/docs/data-manipulation-language#dml_statement_conflicts"
    ),
}

# Reasons that concern the whole project, not a message: errors[].reason of an ErrorProto
# (https://cloud.google.com/bigquery/docs/error-messages) or the google.rpc.ErrorInfo
# reason of a disabled API (https://cloud.google.com/apis/design/errors#error_info).
GLOBAL_REASONS: dict[str, str] = {
    "accessDenied": "permission_denied",
    "billingNotEnabled": "not_enabled",
    "SERVICE_DISABLED": "not_enabled",
    "BILLING_DISABLED": "not_enabled",
}
GLOBAL_GRPC_CODES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
}

StorageErrorCode = storage_types.StorageError.StorageErrorCode

# The Storage Write API sees a column added by tables.patch only minutes later and
# refuses rows carrying it meanwhile:
# https://cloud.google.com/bigquery/docs/write-api#schema_updates (hence a wait, not a failure).
SCHEMA_PENDING_CODES = frozenset({StorageErrorCode.SCHEMA_MISMATCH_EXTRA_FIELDS})
SCHEMA_PENDING_RETRY_SECONDS = 30.0

_NETWORK_ERRORS = (
    StreamClosedError,  # an AppendRows connection ended before answering
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    TransportError,
)


class SchemaPendingError(TransientWarehouseError):
    """Rows carry a column the Storage Write API does not see yet: only this table waits."""


class RowsRefusedError(TerminalWarehouseError):
    """AppendRows refused single rows (nothing of that request was written).

    `row_errors` maps the row's position within the request to its reason.
    """

    def __init__(self, message: str, row_errors: dict[int, str]) -> None:
        super().__init__(message)
        self.row_errors = row_errors


def reasons(exc: BaseException) -> set[str]:
    """The `reason` of every ErrorProto an api_core exception carries."""
    out: set[str] = set()
    for err in getattr(exc, "errors", None) or ():
        if isinstance(err, dict) and err.get("reason"):
            out.add(str(err["reason"]))
    reason = getattr(exc, "reason", None)  # google.rpc.ErrorInfo, when present
    if isinstance(reason, str) and reason:
        out.add(reason)
    return out


def dml_concurrency_doc(exc: BaseException) -> str | None:
    """The doc URL of a documented DML concurrency error `exc` is, else None."""
    texts = [str(getattr(exc, "message", "") or "")]
    texts += [str(e.get("message", "")) for e in getattr(exc, "errors", None) or () if isinstance(e, dict)]
    for text in texts:
        low = text.lower()
        for phrase, url in DML_CONCURRENCY_PHRASES.items():
            if phrase in low:
                return url
    return None


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    code = getattr(exc, "grpc_status_code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        try:
            return exc.code()  # type: ignore[no-any-return]
        except Exception:  # pragma: no cover - a half-built call object
            return None
    return None


def storage_error_codes(details: Iterable[Any]) -> set[int]:
    """StorageError codes among error details: packed `Any`s of an AppendRows error
    status, or the messages api_core unpacked into a gRPC exception's `details`."""
    codes: set[int] = set()
    storage_pb = storage_types.StorageError.pb()
    for detail in details:
        if isinstance(detail, any_pb2.Any) and detail.Is(storage_pb.DESCRIPTOR):
            unpacked = storage_pb()
            detail.Unpack(unpacked)
            codes.add(int(unpacked.code))
        elif isinstance(detail, (storage_pb, storage_types.StorageError)):
            codes.add(int(detail.code))
    return codes


def _append_response(exc: BaseException):
    response = getattr(exc, "response", None)
    return response if isinstance(response, storage_types.AppendRowsResponse) else None


def retry_after(exc: BaseException) -> float | None:
    """Seconds from an HTTP `Retry-After` header, when the server sent one."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def global_reason(exc: BaseException) -> str | None:
    """The label of an error that concerns the whole project (see GLOBAL_REASONS), else None.
    Quota and rate limits are answered as 403 too: callers rule those out first."""
    if isinstance(exc, RefreshError):
        return "credentials"
    for reason in sorted(reasons(exc)):
        if reason in GLOBAL_REASONS:
            return GLOBAL_REASONS[reason]
    if isinstance(exc, gexc.Unauthorized):
        return "unauthenticated"
    # a REST 403 (api_core's Forbidden, no gRPC code) is judged by its reason only: it may
    # be about one query (`responseTooLarge`)
    code = grpc_code(exc)
    if code in GLOBAL_GRPC_CODES:
        return GLOBAL_GRPC_CODES[code]
    return None


def is_transient(exc: BaseException) -> bool:
    return isinstance(translate(exc, "call"), TransientWarehouseError)


def translate(exc: BaseException, what: str) -> TransientWarehouseError | TerminalWarehouseError:
    """`exc` as the seam's error, the message prefixed with what was being done."""
    if isinstance(exc, (TransientWarehouseError, TerminalWarehouseError)):
        return exc
    text = f"BigQuery {what}: {exc}"
    response = _append_response(exc)
    if response is not None and response.row_errors:
        row_errors = {int(e.index): f"{e.code.name}: {e.message}" for e in response.row_errors}
        return RowsRefusedError(text, row_errors)
    details = list(response.error.details) if response is not None else list(getattr(exc, "details", None) or ())
    if storage_error_codes(details) & SCHEMA_PENDING_CODES:
        return SchemaPendingError(text, retry_after=SCHEMA_PENDING_RETRY_SECONDS)
    if isinstance(exc, _NETWORK_ERRORS) or isinstance(exc, gexc.RetryError):
        return TransientWarehouseError(text)
    if reasons(exc) & TRANSIENT_REASONS or dml_concurrency_doc(exc):
        return TransientWarehouseError(text, retry_after=retry_after(exc))
    unavailable = global_reason(exc)
    if unavailable is not None:
        return WarehouseUnavailable(text, reason=unavailable)
    code = getattr(exc, "code", None)
    if isinstance(exc, gexc.GoogleAPICallError) and isinstance(code, int) and code in TRANSIENT_HTTP_STATUS:
        return TransientWarehouseError(text, retry_after=retry_after(exc))
    if grpc_code(exc) in TRANSIENT_GRPC_CODES:
        return TransientWarehouseError(text)
    return TerminalWarehouseError(text)


def is_not_found(exc: BaseException) -> bool:
    """`exc`, or an error it was raised from, says something is gone (404 / NOT_FOUND)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # a wrapped error may be its own cause
        if isinstance(current, gexc.NotFound) or grpc_code(current) == grpc.StatusCode.NOT_FOUND:
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def is_schema_conflict(exc: BaseException) -> bool:
    """Another writer changed the table first: 412 (etag), 409 (exists)."""
    return isinstance(exc, (gexc.PreconditionFailed, gexc.Conflict))


def is_permission_denied(exc: BaseException) -> bool:
    """403 / PERMISSION_DENIED that is not a quota or rate limit."""
    cause = exc.__cause__ or exc
    return (isinstance(cause, gexc.Forbidden) or grpc_code(cause) == grpc.StatusCode.PERMISSION_DENIED) and not (
        reasons(cause) & TRANSIENT_REASONS
    )
