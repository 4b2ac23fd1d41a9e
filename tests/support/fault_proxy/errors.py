"""BigQuery REST errors in the shape Google sends them.

Every BigQuery REST error is an HTTP status plus a JSON body
`{"error": {"code", "message", "errors": [{"message", "domain", "reason", ...}], "status"}}`;
the machine-readable part is `errors[].reason` (the "Error message" column of
https://cloud.google.com/bigquery/docs/error-messages), `status` is the canonical gRPC
code name. A job that fails reports the same `ErrorProto` as `status.errorResult` (and
`status.errors`) of the job resource, and `jobs.getQueryResults` / `jobs.query` answer
it as the HTTP error.

- `quotaExceeded` (403): a longer-term quota; and `rateLimitExceeded` (403): a
  short-term rate limit ("retry the operation after few seconds ... use exponential
  backoff"). Body shape and both reasons:
  https://cloud.google.com/bigquery/docs/troubleshoot-quotas#overview
  (e.g. "Exceeded rate limits: too many table update operations for this table",
  https://cloud.google.com/bigquery/docs/troubleshoot-quotas#ts-maximum-update-table-metadata-limit).
- `accessDenied` (403, status PERMISSION_DENIED): the caller may not touch the resource
  (a revoked role): https://cloud.google.com/bigquery/docs/error-messages#errortable
- The DML queue: at most 20 mutating DML statements queued per table
  (https://cloud.google.com/bigquery/quotas#data_manipulation_language_statements);
  the 21st fails as 400 `resourcesExceeded` "Resources exceeded during query execution:
  Too many DML statements outstanding against table ..., limit is 20" (as reported by
  users, e.g. https://github.com/m-lab/etl-gardener/issues/293).
- Concurrent update: mutating DML on a table another job changed meanwhile fails as
  400 `invalidQuery` "Could not serialize access to table ... due to concurrent update"
  (https://cloud.google.com/bigquery/docs/troubleshoot-queries#could_not_serialize_access_to_table_due_to_concurrent_update;
  body as seen in https://github.com/confluentinc/kafka-connect-bigquery/issues/279).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

QUERY_KINDS = frozenset({"jobs.insert", "jobs.query"})
TABLE_UPDATE_KINDS = frozenset({"tables.patch", "tables.update"})


@dataclass(frozen=True)
class GoogleError:
    http_status: int
    reason: str  # errors[].reason
    message: str
    status: str  # canonical gRPC code name, `error.status`
    # "http": the call itself fails with the error. "job": the job is accepted and fails
    # (jobs.insert answers 200 with status.errorResult; reading its results fails).
    surface: Literal["http", "job"] = "http"
    location: str | None = None
    location_type: str | None = None

    def error_proto(self) -> dict[str, Any]:
        proto: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.location is not None:
            proto["location"] = self.location
        if self.location_type is not None:
            proto["locationType"] = self.location_type
        return proto

    def body(self) -> bytes:
        entry = {"domain": "global", **self.error_proto()}
        return json.dumps(
            {"error": {"code": self.http_status, "message": self.message, "errors": [entry], "status": self.status}}
        ).encode()


def quota_exceeded(what: str = "Your project exceeded quota for concurrent queries") -> GoogleError:
    return GoogleError(403, "quotaExceeded", f"Quota exceeded: {what}.", "PERMISSION_DENIED")


def rate_limit_exceeded(what: str = "too many table update operations for this table") -> GoogleError:
    return GoogleError(403, "rateLimitExceeded", f"Exceeded rate limits: {what}.", "PERMISSION_DENIED")


def access_denied(what: str = "Dataset p:d: Permission bigquery.tables.getData denied") -> GoogleError:
    return GoogleError(403, "accessDenied", f"Access Denied: {what}", "PERMISSION_DENIED")


ALL_KINDS = frozenset(
    {
        "jobs.insert", "jobs.get", "jobs.query", "jobs.getQueryResults", "jobs.cancel", "jobs.list",
        "datasets.get", "datasets.insert", "tables.get", "tables.insert", "tables.patch", "tables.update",
        "tables.list", "tabledata.insertAll", "tabledata.list",
    }
)  # fmt: skip


def dml_queue_full(table: str = "the table") -> GoogleError:
    return GoogleError(
        400, "resourcesExceeded",
        f"Resources exceeded during query execution: Too many DML statements outstanding against table {table}, limit is 20",
        "INVALID_ARGUMENT", surface="job",
    )  # fmt: skip


def concurrent_update(table: str = "the table") -> GoogleError:
    return GoogleError(
        400, "invalidQuery", f"Could not serialize access to table {table} due to concurrent update",
        "INVALID_ARGUMENT", surface="job", location="q", location_type="parameter",
    )  # fmt: skip
