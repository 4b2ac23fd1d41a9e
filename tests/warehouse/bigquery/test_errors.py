"""BigQuery error translation (app/warehouse/bigquery/errors.py), with errors built the
way the client libraries build them: api_core's constructors and `from_http_response`
on Google's JSON error body, gRPC statuses, and AppendRowsResponse messages wrapped as
`AppendRowsStream` wraps them. No emulator needed.
"""

from __future__ import annotations

import json

import grpc
import pytest
import requests
from google.auth.exceptions import RefreshError
from google.api_core import exceptions as gexc
from google.cloud.bigquery_storage_v1 import types as storage_types
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2

from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError, WarehouseUnavailable
from app.warehouse.bigquery import errors


def http_error(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> gexc.GoogleAPICallError:
    """What the REST client raises for Google's JSON error body."""
    response = requests.Response()
    response.status_code = status
    response.headers.update({"Content-Type": "application/json", **(headers or {})})
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
    response._content = json.dumps(body).encode()
    response.request = requests.Request("POST", "https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs").prepare()
    return gexc.from_http_response(response)


def append_failure(response: storage_types.AppendRowsResponse) -> gexc.GoogleAPICallError:
    """What `AppendRowsStream` sets on the future of a request answered with an error."""
    return gexc.from_grpc_status(response.error.code, response.error.message, response=response)


@pytest.mark.parametrize(
    "status, reason, message",
    [
        (403, "quotaExceeded", "Quota exceeded: Your table exceeded quota for table update operations."),
        (403, "rateLimitExceeded", "Exceeded rate limits: too many table update operations for this table."),
        (400, "jobRateLimitExceeded", "Exceeded rate limits: too many concurrent queries."),
        (500, "backendError", "Backend error. Job aborted."),
        (503, "backendError", "Service unavailable."),
        (500, "internalError", "An internal error occurred."),
        # the documented DML concurrency errors: HTTP 400 with the generic reason
        (400, "invalidQuery", "Could not serialize access to table p:d.t due to concurrent update"),
        (400, "invalidQuery", "Too many DML statements outstanding against table p:d.t, limit is 20."),
    ],
)
def test_quota_rate_backend_and_dml_concurrency_errors_are_transient(status: int, reason: str, message: str) -> None:
    exc = http_error(status, reason, message)
    translated = errors.translate(exc, "add column note")
    assert isinstance(translated, TransientWarehouseError), (status, reason)
    assert "add column note" in str(translated)


def test_reason_is_read_from_errors_not_from_the_message() -> None:
    # api_core's own constructor: the reason lives in errors[], the message says nothing of it
    exc = gexc.Forbidden("Your project exceeded quota.", errors=[{"reason": "quotaExceeded", "message": "..."}])
    assert errors.is_transient(exc)
    # ... and a message that merely mentions a reason word is not a quota error
    denied = errors.translate(
        gexc.Forbidden("column rateLimitExceeded: access denied", errors=[{"reason": "accessDenied"}]), "x"
    )
    assert isinstance(denied, WarehouseUnavailable) and denied.reason == "permission_denied"


def test_retry_after_header_is_passed_on() -> None:
    exc = http_error(429, "rateLimitExceeded", "Too many requests", headers={"Retry-After": "7"})
    assert errors.translate(exc, "x").retry_after == 7.0


@pytest.mark.parametrize(
    "status, reason",
    [(400, "invalid"), (400, "invalidQuery"), (404, "notFound"), (403, "responseTooLarge"), (409, "duplicate")],
)
def test_request_errors_are_terminal(status: int, reason: str) -> None:
    exc = http_error(status, reason, "Syntax error: Unexpected identifier")
    assert isinstance(errors.translate(exc, "x"), TerminalWarehouseError)


def test_not_found_and_permission_denied_are_recognised_through_the_translation() -> None:
    missing = http_error(404, "notFound", "Not found: Table p:d.t")
    wrapped = errors.translate(missing, "x")
    wrapped.__cause__ = missing
    assert errors.is_not_found(wrapped)
    denied = http_error(403, "accessDenied", "Access Denied: Dataset p:d")
    wrapped = errors.translate(denied, "x")
    wrapped.__cause__ = denied
    assert errors.is_permission_denied(wrapped)
    quota = http_error(403, "quotaExceeded", "Quota exceeded")
    wrapped = errors.translate(quota, "x")
    wrapped.__cause__ = quota
    assert not errors.is_permission_denied(wrapped)


@pytest.mark.parametrize(
    "code, transient",
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.ABORTED, True),
        (grpc.StatusCode.INTERNAL, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.PERMISSION_DENIED, True),  # the whole warehouse: see below
        (grpc.StatusCode.NOT_FOUND, False),
    ],
)
def test_grpc_status_codes(code: grpc.StatusCode, transient: bool) -> None:
    exc = gexc.from_grpc_status(code, "append failed")
    assert errors.is_transient(exc) is transient


@pytest.mark.parametrize(
    "exc, reason",
    [
        (http_error(403, "accessDenied", "Access Denied: Table p:d.t: Permission bigquery.tables.updateData denied"), "permission_denied"),
        (http_error(403, "billingNotEnabled", "Billing has not been enabled for this project."), "not_enabled"),
        (http_error(401, "authError", "Request had invalid authentication credentials."), "unauthenticated"),
        (gexc.from_grpc_status(grpc.StatusCode.PERMISSION_DENIED, "append denied"), "permission_denied"),
        (gexc.from_grpc_status(grpc.StatusCode.UNAUTHENTICATED, "no credentials"), "unauthenticated"),
        (gexc.PermissionDenied("Permission 'TABLES_UPDATE_DATA' denied on resource"), "permission_denied"),
        (RefreshError("invalid_grant: account not found"), "credentials"),
    ],
)
def test_permission_credential_and_not_enabled_errors_make_the_warehouse_unavailable(exc: Exception, reason: str) -> None:
    translated = errors.translate(exc, "dedup lookup for t")
    assert isinstance(translated, WarehouseUnavailable)  # transient: never counted towards dead-lettering
    assert translated.reason == reason


def test_a_disabled_api_is_read_from_its_error_info() -> None:
    info = error_details_pb2.ErrorInfo(reason="SERVICE_DISABLED", domain="googleapis.com")
    exc = gexc.Forbidden("BigQuery API has not been used in project p before or it is disabled", error_info=info)
    assert errors.translate(exc, "x").reason == "not_enabled"


def test_a_quota_403_stays_an_ordinary_transient_error() -> None:
    translated = errors.translate(http_error(403, "quotaExceeded", "Quota exceeded"), "x")
    assert isinstance(translated, TransientWarehouseError) and not isinstance(translated, WarehouseUnavailable)


def test_network_errors_and_exhausted_retries_are_transient() -> None:
    assert errors.is_transient(requests.exceptions.ConnectionError("reset"))
    assert errors.is_transient(ConnectionResetError())
    assert errors.is_transient(gexc.RetryError("Timeout of 10.0s exceeded", cause=gexc.ServiceUnavailable("down")))


def storage_error_status(code: storage_types.StorageError.StorageErrorCode, message: str) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        storage_types.StorageError.pb()(code=code, entity="projects/p/datasets/d/tables/t", error_message=message)
    )
    return status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message, details=[detail])


def test_new_column_not_yet_visible_to_the_write_stream_is_schema_pending() -> None:
    message = "Input schema has more fields than BigQuery schema, extra fields: 'note'"
    response = storage_types.AppendRowsResponse(
        error=storage_error_status(storage_types.StorageError.StorageErrorCode.SCHEMA_MISMATCH_EXTRA_FIELDS, message)
    )
    translated = errors.translate(append_failure(response), "AppendRows to t")
    assert isinstance(translated, errors.SchemaPendingError) and isinstance(translated, TransientWarehouseError)
    assert translated.retry_after == errors.SCHEMA_PENDING_RETRY_SECONDS


def test_other_storage_errors_stay_terminal() -> None:
    response = storage_types.AppendRowsResponse(
        error=storage_error_status(storage_types.StorageError.StorageErrorCode.INVALID_STREAM_TYPE, "bad stream")
    )
    assert isinstance(errors.translate(append_failure(response), "x"), TerminalWarehouseError)


def test_append_row_errors_name_the_rows() -> None:
    response = storage_types.AppendRowsResponse(
        error=status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="Rows are invalid"),
        row_errors=[
            storage_types.RowError(
                index=3, code=storage_types.RowError.RowErrorCode.FIELDS_ERROR, message="bad geography"
            ),
        ],
    )
    translated = errors.translate(append_failure(response), "AppendRows to t")
    assert isinstance(translated, errors.RowsRefusedError) and isinstance(translated, TerminalWarehouseError)
    assert translated.row_errors == {3: "FIELDS_ERROR: bad geography"}


def test_schema_pending_on_a_failed_append_rpc() -> None:
    # the connection itself failed with the StorageError in its status details
    detail = storage_types.StorageError.pb()(
        code=storage_types.StorageError.StorageErrorCode.SCHEMA_MISMATCH_EXTRA_FIELDS, error_message="extra field"
    )
    exc = gexc.InvalidArgument("Input schema has more fields than BigQuery schema", details=[detail])
    assert isinstance(errors.translate(exc, "x"), errors.SchemaPendingError)
    assert not isinstance(errors.translate(gexc.InvalidArgument("bad", details=[]), "x"), TransientWarehouseError)


def test_a_connection_closed_before_answering_is_transient() -> None:
    from google.cloud.bigquery_storage_v1.exceptions import StreamClosedError

    assert errors.is_transient(StreamClosedError("Stream closed before receiving a response."))
