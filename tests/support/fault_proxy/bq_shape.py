"""Google's REST wire behaviour over bqemulator, where the emulator (1.4.0) departs from it.

The app runs one code path, Google's; this layer, inside `BigQueryRestProxy`, makes the
emulator answer it the way Google does:

- One call at a time: bqemulator runs every request on one DuckDB connection and mixes
  up concurrent ones, so every call to one emulator is serialized here (`emulator_lock`),
  across all proxies of the test process.
- `jobs.query` of a failing statement: the emulator answers 200 with `errors[]`; Google
  answers the HTTP error, which `query_and_wait` raises
  (https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/query,
  https://cloud.google.com/bigquery/docs/error-messages).
- `jobs.insert` of a job id that exists: the emulator runs it again; Google answers 409
  `duplicate` (https://cloud.google.com/bigquery/docs/error-messages#errortable).
- `jobs.getQueryResults` of DML: the emulator leaves out `numDmlAffectedRows`; it is
  taken from the job's statistics, as Google reports it.
- Table etags: the emulator ignores `If-Match` on `tables.patch`/`tables.update`; Google
  refuses a stale etag with 412 (the client library sends the table's etag:
  https://cloud.google.com/python/docs/reference/bigquery/latest/google.cloud.bigquery.client.Client#google_cloud_bigquery_client_Client_update_table).
- A patch that adds columns changes only the emulator's catalog: the columns are added
  to its storage first, one `ALTER TABLE` each.
- `ALTER TABLE ... ADD COLUMN a ..., ADD COLUMN b ...`: the emulator takes one ALTER per
  statement; it is split.
- `jobs.query` with a `defaultDataset`: the emulator ignores it there (its `jobs.insert`
  honours it), so such a query runs as a job whose results are the answer.
- `tables.insert` into a missing dataset: the emulator answers 500, Google 404 `notFound`.
- BYTES query parameters: the emulator compares their base64 text, not the bytes; they
  are sent as STRING and decoded in SQL (`FROM_BASE64`).
- `requirePartitionFilter`: the emulator neither keeps nor enforces it. It is kept here
  (set by `tables.insert`/`patch`/`update`, shown by their answers and `tables.get`), and
  a query naming such a table without a filter on `_PARTITIONTIME` is refused with 400
  `invalidQuery`, as Google does
  (https://cloud.google.com/bigquery/docs/managing-partitioned-tables#require-filter).
  A rough test (the SQL mentions `_PARTITIONTIME`), enough for the pipeline's statements.
- `ALTER TABLE ... ALTER COLUMN c SET DATA TYPE T`: the emulator converts its storage
  (NUMERIC as its DECIMAL(18,3), losing digits) but keeps the old type in its catalog.
  Here the storage is converted with NUMERIC as NUMERIC(38, 9), as Google keeps it, and
  the catalog's type is changed too.
- GEOGRAPHY query results: the emulator types them BYTES (values are WKT text); a BYTES
  column whose values are not base64 is a GEOGRAPHY, as Google types it. (A column with no
  non-null value cannot be told apart and stays BYTES.)
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import httpx

_LOCKS: dict[str, threading.Semaphore] = {}
_LOCKS_GUARD = threading.Lock()

_ALTER = re.compile(r"^\s*ALTER\s+TABLE\s+(?P<ref>[`\w.\-]+)\s+(?P<rest>ADD\s+COLUMN\b.*)$", re.IGNORECASE | re.DOTALL)
_ADD_COLUMN_SPLIT = re.compile(r",\s*(?=ADD\s+COLUMN\b)", re.IGNORECASE)
_HTTP_STATUS_OF_REASON = {"notFound": 404, "accessDenied": 403, "duplicate": 409}
_STATUS_NAME = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION"}
_SET_DATA_TYPE = re.compile(
    r"^\s*ALTER\s+TABLE\s+`(?P<ref>[\w.\-]+)`\s+ALTER\s+COLUMN\s+`?(?P<col>\w+)`?\s+SET\s+DATA\s+TYPE\s+(?P<type>\w+)\s*$",
    re.IGNORECASE,
)
_STORAGE_TYPE = {"NUMERIC": "NUMERIC(38, 9)"}  # the emulator's own NUMERIC is DECIMAL(18,3)
_MISSING_TABLE = re.compile(r"Catalog Error: Table with name (?P<name>\S+) does not exist", re.IGNORECASE)


def emulator_lock(host: str) -> threading.Semaphore:
    """The one baton of the emulator on `host` (its REST and gRPC ports share one DuckDB
    connection). A semaphore, not a lock: a gRPC call takes it on the thread that sends
    a request and gives it back on the one that reads the answer."""
    host = host.removeprefix("http://").rsplit(":", 1)[0]
    with _LOCKS_GUARD:
        lock = _LOCKS.get(host)
        if lock is None:
            lock = _LOCKS[host] = threading.Semaphore(1)
        return lock


@dataclass
class Answer:
    status: int
    content: bytes
    content_type: str | None = None


def error_answer(status: int, reason: str, message: str) -> Answer:
    body = {
        "error": {
            "code": status, "message": message, "errors": [{"domain": "global", "reason": reason, "message": message}],
            "status": _STATUS_NAME.get(status, "UNKNOWN"),
        }
    }  # fmt: skip
    return Answer(status, json.dumps(body).encode())


class GoogleShape:
    """Forwards one call to bqemulator and answers it in Google's shape."""

    def __init__(self, upstream: str, http: httpx.Client) -> None:
        self.upstream = upstream
        self.http = http
        self.lock = emulator_lock(upstream)
        self.require_partition_filter: set[tuple[str, str]] = set()  # (dataset, table)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.lock:
            return self._raw(method, path, **kwargs)

    def _raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, the baton already held. A new connection per call: the emulator drops
        a kept-alive one after its 500s."""
        headers = {**kwargs.pop("headers", {}), "Connection": "close"}
        return self.http.request(method, self.upstream + path, headers=headers, **kwargs)

    def forward(self, method: str, path: str, kind: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> Answer:
        with self.lock:
            payload = json_or_none(body)
            early = self._before(kind, params, payload, headers)
            if early is not None:
                return early
            if isinstance(payload, dict) and kind in ("jobs.query", "jobs.insert"):
                body = json.dumps(payload).encode()
                headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            if kind == "jobs.query" and isinstance(payload, dict) and payload.get("defaultDataset"):
                upstream = self._query_as_job(params.get("project", ""), payload)
            else:
                upstream = self._raw(method, path, content=body, headers=headers)
            return self._after(kind, params, upstream)

    def _query_as_job(self, project: str, payload: dict) -> httpx.Response:
        """`jobs.query` run as `jobs.insert` + `jobs.getQueryResults`; a failed job answers
        200 with `errors[]`, as the emulator's jobs.query does (translated after)."""
        fields = ("query", "useLegacySql", "defaultDataset", "queryParameters", "parameterMode")
        job = {"configuration": {"query": {k: payload[k] for k in fields if k in payload}}}
        inserted = self._raw("POST", f"/bigquery/v2/projects/{project}/jobs", json=job)
        if inserted.status_code >= 300:
            return inserted
        resource = inserted.json()
        failure = (resource.get("status") or {}).get("errorResult")
        if failure:
            return httpx.Response(200, json={"kind": "bigquery#queryResponse", "errors": [failure]})
        job_id = resource["jobReference"]["jobId"]
        results = self._raw("GET", f"/bigquery/v2/projects/{project}/queries/{job_id}")
        if results.status_code < 300 and "numDmlAffectedRows" not in results.json():
            answer = results.json()
            self._dml_count({"project": project, "job": job_id}, answer)
            return httpx.Response(200, json=answer)
        return results

    # ------------------------------------------------------------------ before forwarding
    def _before(self, kind: str, params: dict[str, str], payload: Any, headers: dict[str, str]) -> Answer | None:
        project = params.get("project", "")
        if kind in ("jobs.query", "jobs.insert") and isinstance(payload, dict):
            query = payload if kind == "jobs.query" else (payload.get("configuration") or {}).get("query")
            if isinstance(query, dict) and query.get("query"):
                failed = self._set_data_type(project, query) or self._partition_filter_missing(query)
                if failed is not None:
                    return failed
                _bytes_params_as_text(query)
                statements = _split_alter(query["query"])
                for statement in statements[:-1]:
                    done = self._run(project, statement)
                    if done is not None:
                        return done
                query["query"] = statements[-1]
        if kind == "jobs.insert" and isinstance(payload, dict):
            ref = payload.get("jobReference") or {}
            job_id = ref.get("jobId")
            if job_id and self._raw("GET", f"/bigquery/v2/projects/{project}/jobs/{job_id}").status_code == 200:
                location = ref.get("location") or "US"
                return error_answer(409, "duplicate", f"Already Exists: Job {project}:{location}.{job_id}")
        if kind in ("tables.insert", "tables.patch", "tables.update") and isinstance(payload, dict):
            self._note_partition_filter(params, payload)
        if kind in ("tables.patch", "tables.update") and isinstance(payload, dict):
            return self._before_table_update(params, payload, headers)
        return None

    def _note_partition_filter(self, params: dict[str, str], payload: dict) -> None:
        if "requirePartitionFilter" not in payload:
            return
        ref = payload.get("tableReference") or {}
        key = (params.get("dataset") or ref.get("datasetId", ""), params.get("table") or ref.get("tableId", ""))
        if payload["requirePartitionFilter"]:
            self.require_partition_filter.add(key)
        else:
            self.require_partition_filter.discard(key)

    def _set_data_type(self, project: str, query: dict) -> Answer | None:
        """Run an ALTER COLUMN SET DATA TYPE the way Google keeps it; the statement itself
        becomes a no-op query (so its job still answers). Its error, else None."""
        found = _SET_DATA_TYPE.match(query["query"])
        if found is None:
            return None
        *_, dataset, table = found["ref"].split(".")
        new_type = found["type"].upper()
        storage = f"ALTER TABLE `{found['ref']}` ALTER COLUMN `{found['col']}` SET DATA TYPE {_STORAGE_TYPE.get(new_type, new_type)}"
        failed = self._run(project, storage)
        if failed is not None:
            return failed
        path = f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}"
        resource = self._raw("GET", path).json()
        for field in resource["schema"]["fields"]:
            if field["name"] == found["col"]:
                field["type"] = new_type
        patched = self._raw("PATCH", path, json={"schema": resource["schema"]})
        if patched.status_code != 200:
            return Answer(patched.status_code, patched.content, patched.headers.get("content-type"))
        query["query"] = "SELECT 1"
        return None

    def _partition_filter_missing(self, query: dict) -> Answer | None:
        sql = query["query"]
        if "_PARTITIONTIME" in sql.upper() or re.match(r"\s*(ALTER|CREATE|DROP)\b", sql, re.IGNORECASE):
            return None  # DDL needs no partition filter
        default = (query.get("defaultDataset") or {}).get("datasetId", "")
        for dataset, table in self.require_partition_filter:
            named = re.search(rf"`(?:[\w-]+\.)?{re.escape(dataset)}\.{re.escape(table)}`", sql) or (
                dataset == default and re.search(rf"`{re.escape(table)}`|\b{re.escape(table)}\b", sql)
            )
            if named:
                return error_answer(
                    400, "invalidQuery",
                    f"Cannot query over table '{dataset}.{table}' without a filter over column(s) '_PARTITION_LOAD_TIME', "
                    "'_PARTITIONDATE', '_PARTITIONTIME' that can be used for partition elimination",
                )  # fmt: skip
        return None

    def _before_table_update(self, params: dict[str, str], payload: dict, headers: dict[str, str]) -> Answer | None:
        project, dataset, table = params["project"], params["dataset"], params["table"]
        current = self._raw("GET", f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}")
        if current.status_code != 200:
            return None  # the update answers the same error
        resource = current.json()
        if_match = next((v for k, v in headers.items() if k.lower() == "if-match"), None)
        if if_match is not None and if_match != resource.get("etag"):
            return error_answer(412, "conditionNotMet", "Precondition check failed.")
        existing = {f["name"].lower() for f in (resource.get("schema") or {}).get("fields", [])}
        for field in (payload.get("schema") or {}).get("fields", []):
            if field["name"].lower() not in existing:
                sql = f"ALTER TABLE `{project}.{dataset}.{table}` ADD COLUMN IF NOT EXISTS `{field['name']}` {field['type']}"
                failed = self._run(project, sql)
                if failed is not None:
                    return failed
        return None

    def _run(self, project: str, sql: str) -> Answer | None:
        """Run one statement on the emulator; its error in Google's shape, None when it ran."""
        r = self._raw("POST", f"/bigquery/v2/projects/{project}/queries", json={"query": sql, "useLegacySql": False})
        return _query_failure(r)

    # ------------------------------------------------------------------ after forwarding
    def _after(self, kind: str, params: dict[str, str], upstream: httpx.Response) -> Answer:
        content_type = upstream.headers.get("content-type")
        answer = json_or_none(upstream.content)
        if kind == "tables.insert" and upstream.status_code == 500:
            project, dataset = params["project"], params["dataset"]
            if self._raw("GET", f"/bigquery/v2/projects/{project}/datasets/{dataset}").status_code == 404:
                return error_answer(404, "notFound", f"Not found: Dataset {project}:{dataset}")
        if upstream.status_code >= 300 or not isinstance(answer, dict):
            return Answer(upstream.status_code, upstream.content, content_type)
        if kind == "jobs.query":
            failed = _query_failure(upstream)
            if failed is not None:
                return failed
        if kind in ("tables.get", "tables.insert", "tables.patch", "tables.update"):
            ref = answer.get("tableReference") or {}
            if (ref.get("datasetId"), ref.get("tableId")) in self.require_partition_filter:
                answer["requirePartitionFilter"] = True
        if kind in ("jobs.query", "jobs.getQueryResults"):
            _geography_types(answer)
            if kind == "jobs.getQueryResults" and "numDmlAffectedRows" not in answer:
                self._dml_count(params, answer)
        return Answer(upstream.status_code, json.dumps(answer).encode(), content_type)

    def _dml_count(self, params: dict[str, str], answer: dict) -> None:
        job = self._raw("GET", f"/bigquery/v2/projects/{params['project']}/jobs/{params['job']}")
        if job.status_code == 200:
            count = ((job.json().get("statistics") or {}).get("query") or {}).get("numDmlAffectedRows")
            if count is not None:
                answer["numDmlAffectedRows"] = count


def _query_failure(r: httpx.Response) -> Answer | None:
    """A jobs.query answered 200 with `errors[]`, as Google's HTTP error; None if it ran."""
    if r.status_code >= 300:
        return Answer(r.status_code, r.content, r.headers.get("content-type"))
    answer = json_or_none(r.content)
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if not errors:
        return None
    first = errors[0]
    message = str(first.get("message", "query failed"))
    missing = _MISSING_TABLE.search(message)
    if missing:  # Google: 404 notFound for a table that does not exist
        return error_answer(404, "notFound", f"Not found: Table {missing['name']}")
    reason = str(first.get("reason") or "invalidQuery")
    return error_answer(_HTTP_STATUS_OF_REASON.get(reason, 400), reason, message)


def _split_alter(sql: str) -> list[str]:
    """`ALTER TABLE t ADD COLUMN a .., ADD COLUMN b ..` as one ALTER per column."""
    match = _ALTER.match(sql)
    if not match:
        return [sql]
    parts = _ADD_COLUMN_SPLIT.split(match["rest"].strip().rstrip(";"))
    return [f"ALTER TABLE {match['ref']} {part.strip()}" for part in parts]


def _bytes_params_as_text(query: dict) -> None:
    """BYTES parameters as STRING base64 text, decoded in the SQL (named and positional)."""
    params = query.get("queryParameters") or []
    sql = query["query"]
    positional = [i for i, p in enumerate(params) if not p.get("name")]
    decoded_positions: set[int] = set()
    for i, p in enumerate(params):
        if (p.get("parameterType") or {}).get("type") != "BYTES":
            continue
        p["parameterType"] = {"type": "STRING"}
        if p.get("name"):
            sql = re.sub(rf"@{re.escape(p['name'])}\b", f"FROM_BASE64(@{p['name']})", sql)
        else:
            decoded_positions.add(positional.index(i))
    if decoded_positions:
        sql = _wrap_positional(sql, decoded_positions)
    query["query"] = sql


def _wrap_positional(sql: str, positions: set[int]) -> str:
    """`?` number n (outside quotes) as FROM_BASE64(?) for each n in `positions`."""
    out: list[str] = []
    quote: str | None = None
    n = 0
    for ch in sql:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == "?":
            out.append("FROM_BASE64(?)" if n in positions else "?")
            n += 1
            continue
        out.append(ch)
    return "".join(out)


def _geography_types(answer: dict) -> None:
    fields = (answer.get("schema") or {}).get("fields") or []
    rows = answer.get("rows") or []
    for i, field in enumerate(fields):
        if field.get("type") != "BYTES" or field.get("mode") == "REPEATED":
            continue
        values = [row["f"][i].get("v") for row in rows if i < len(row.get("f", []))]
        values = [v for v in values if isinstance(v, str)]
        if values and not all(_is_base64(v) for v in values):
            field["type"] = "GEOGRAPHY"


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def json_or_none(body: bytes) -> Any:
    """The JSON of a body, or None for an empty or non-JSON one."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
