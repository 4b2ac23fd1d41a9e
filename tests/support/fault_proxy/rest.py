"""HTTP reverse proxy for BigQuery's REST API with Google's errors, delays and call counts.

Point `BIGQUERY_EMULATOR_HOST` at `BigQueryRestProxy.address`; calls go on to
bqemulator unless a `Rule` matches. In front of bqemulator itself, the proxy answers in
Google's shape where the emulator departs from it (`bq_shape.GoogleShape`, one call at a
time per emulator); in front of another proxy it only adds its own faults. A rule names API methods (`kinds`, e.g.
`jobs.insert`, `jobs.query`, `tables.patch`; see `classify`), optionally a regex on the
query text (`sql`, for jobs.insert / jobs.query) or on the path or body (`target`), and how
long it lasts (`times` matching calls, or `seconds` from its first match). It answers
with a `GoogleError` (shapes and their Google docs in `errors.py`) and/or adds a delay.

How an error reaches the client follows Google:
- `surface="http"` (quota, rate limit): the call fails with the error's HTTP status
  and body, nothing is forwarded.
- `surface="job"` (DML queue, concurrent update): the job was accepted and failed.
  `jobs.insert` answers 200 with the job resource in state DONE carrying
  `status.errorResult`/`status.errors`; `jobs.get` returns that resource and
  `jobs.getQueryResults` the HTTP error; `jobs.query` (which waits for the job) answers
  the HTTP error directly. The statement is never run on the emulator.
  (https://cloud.google.com/bigquery/docs/reference/rest/v2/Job#JobStatus,
  https://cloud.google.com/bigquery/docs/error-messages)

Counts for the benchmark: `calls` (forwarded + faulted, by API method), `faults`
(answered by a rule) and bytes processed / billed per job, read from the job statistics
in the emulator's answers (`totalBytesProcessed`, `statistics.query.totalBytesBilled`), and
query jobs by statement (`statements`, `billable_jobs`: DDL is not billed by bytes).

With a `SchemaVisibility`, the proxy notes each column added to a table (a
`tables.patch`/`tables.update` that grows the schema, or an `ALTER TABLE ... ADD
COLUMN` query), and each column retyped (`ALTER TABLE ... ALTER COLUMN ... SET DATA TYPE`,
with the type it had), so the Storage Write proxy can keep the change from the write
stream for a while, as Google does.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from tests.support.fault_proxy.bq_shape import Answer, GoogleShape, json_or_none
from tests.support.fault_proxy.errors import GoogleError
from tests.support.fault_proxy.late_jobs import LateJobs
from tests.support.fault_proxy.storage_write import SchemaVisibility

_PREFIX = r"^(?:/upload)?/bigquery/v2/projects/(?P<project>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(_PREFIX + p + r"$"), kind)
    for m, p, kind in [
        ("POST", r"/jobs", "jobs.insert"),
        ("GET", r"/jobs", "jobs.list"),
        ("GET", r"/jobs/(?P<job>[^/]+)", "jobs.get"),
        ("POST", r"/jobs/(?P<job>[^/]+)/cancel", "jobs.cancel"),
        ("POST", r"/queries", "jobs.query"),
        ("GET", r"/queries/(?P<job>[^/]+)", "jobs.getQueryResults"),
        ("GET", r"/datasets", "datasets.list"),
        ("POST", r"/datasets", "datasets.insert"),
        ("GET", r"/datasets/(?P<dataset>[^/]+)", "datasets.get"),
        ("PATCH", r"/datasets/(?P<dataset>[^/]+)", "datasets.patch"),
        ("DELETE", r"/datasets/(?P<dataset>[^/]+)", "datasets.delete"),
        ("GET", r"/datasets/(?P<dataset>[^/]+)/tables", "tables.list"),
        ("POST", r"/datasets/(?P<dataset>[^/]+)/tables", "tables.insert"),
        ("GET", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", "tables.get"),
        ("PATCH", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", "tables.patch"),
        ("PUT", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", "tables.update"),
        ("DELETE", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", "tables.delete"),
        ("POST", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)/insertAll", "tabledata.insertAll"),
        ("GET", r"/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)/data", "tabledata.list"),
    ]
]
_ALTER_ADD = re.compile(
    r"ALTER\s+TABLE\s+(?P<ref>[`\w.\-]+)\s+ADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(?P<col>\w+)`?", re.IGNORECASE
)
_ALTER_TYPE = re.compile(
    r"ALTER\s+TABLE\s+(?P<ref>[`\w.\-]+)\s+ALTER\s+COLUMN\s+`?(?P<col>\w+)`?\s+SET\s+DATA\s+TYPE\b", re.IGNORECASE
)
_RUNNING: set[str] = set()  # "http://host:port" of every proxy of this process
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}


def classify(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The API method ("jobs.insert", "tables.patch", ...) of a request, and its path parameters."""
    for m, pattern, kind in _ROUTES:
        if m == method:
            match = pattern.match(path)
            if match:
                return kind, {k: v for k, v in match.groupdict().items() if v is not None}
    return f"{method} other", {}


@dataclass
class Rule:
    """One fault: which calls it matches, what it answers, how long it lasts."""

    kinds: frozenset[str]
    error: GoogleError | None = None  # None: forward (after `delay`)
    times: int | None = None  # matching calls it answers, then it is spent
    seconds: float | None = None  # or: active this long from its first match
    sql: re.Pattern[str] | None = None  # only jobs whose query text matches
    target: re.Pattern[str] | None = None  # only calls whose path or body matches
    delay: float = 0.0
    hits: int = 0
    first_hit: float | None = None

    def matches(self, kind: str, path: str, sql: str | None, body: bytes = b"") -> bool:
        if kind not in self.kinds:
            return False
        if self.sql is not None and (sql is None or not self.sql.search(sql)):
            return False
        if self.target is not None and not (self.target.search(path) or self.target.search(body.decode("utf-8", "replace"))):
            return False
        return True

    def spent(self, now: float) -> bool:
        if self.times is not None and self.hits >= self.times:
            return True
        return self.seconds is not None and self.first_hit is not None and now - self.first_hit >= self.seconds

    def take(self, now: float) -> None:
        self.hits += 1
        if self.first_hit is None:
            self.first_hit = now


@dataclass
class _JobStats:
    processed: dict[str, int] = field(default_factory=dict)  # job id -> bytes
    billed: dict[str, int] = field(default_factory=dict)

    def note(self, body: dict[str, Any]) -> None:
        job = (body.get("jobReference") or {}).get("jobId")
        if not job:
            return
        stats = body.get("statistics") or {}
        query = stats.get("query") or {}
        for target, keys in ((self.processed, ("totalBytesProcessed",)), (self.billed, ("totalBytesBilled",))):
            for value in (body.get(keys[0]), stats.get(keys[0]), query.get(keys[0])):
                if value is not None:
                    target[job] = max(target.get(job, 0), int(value))


class BigQueryRestProxy:
    def __init__(self, upstream: str, *, schema: SchemaVisibility | None = None, host: str = "127.0.0.1") -> None:
        self.upstream = f"http://{upstream}"
        self.schema = schema
        self.rules: list[Rule] = []
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.statements: Counter[str] = Counter()  # query jobs by first keyword (SELECT, DELETE, ALTER, ...)
        self.jobs = _JobStats()
        self._failed_jobs: dict[str, tuple[dict[str, Any], GoogleError]] = {}
        self.late_jobs = LateJobs()  # DML jobs that run after the client stopped waiting
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=300)
        self._server = ThreadingHTTPServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="bq-rest-proxy", daemon=True)
        # straight in front of the emulator: Google's shape; behind another proxy: it has it already
        self.shape = None if self.upstream in _RUNNING else GoogleShape(self.upstream, self._http)
        _RUNNING.add(f"http://{self.address}")

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "BigQueryRestProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        _RUNNING.discard(f"http://{self.address}")
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> "BigQueryRestProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ rules and counts
    def add(
        self,
        error: GoogleError | None,
        kinds: set[str] | frozenset[str],
        *,
        times: int | None = None,
        seconds: float | None = None,
        sql: str | None = None,
        target: str | None = None,
        delay: float = 0.0,
    ) -> Rule:
        rule = Rule(
            frozenset(kinds), error, times, seconds,
            re.compile(sql, re.IGNORECASE | re.DOTALL) if sql else None, re.compile(target) if target else None, delay,
        )  # fmt: skip
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()
            self.faults.clear()
            self.statements.clear()
            self.jobs = _JobStats()

    @property
    def bytes_processed(self) -> int:
        return sum(self.jobs.processed.values())

    @property
    def billable_jobs(self) -> int:
        """Query jobs Google bills by bytes (on demand: at least 10 MB each); DDL is free."""
        return sum(n for word, n in self.statements.items() if word not in ("ALTER", "CREATE", "DROP"))

    @property
    def bytes_billed(self) -> int:
        return sum(self.jobs.billed.values())

    def _rule_for(self, kind: str, path: str, sql: str | None, body: bytes) -> Rule | None:
        now = time.monotonic()
        with self._lock:
            for rule in self.rules:
                if rule.matches(kind, path, sql, body) and not rule.spent(now):
                    rule.take(now)
                    return rule
        return None

    # ------------------------------------------------------------------ one request
    def handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("content-length") or 0)
        body = req.rfile.read(length) if length else b""
        path = req.path.split("?", 1)[0]
        kind, params = classify(req.command, path)
        payload = json_or_none(body)
        sql = _query_text(kind, payload)
        with self._lock:
            self.calls[kind] += 1
            if sql:
                self.statements[(sql.split(None, 1) or ["?"])[0].upper()] += 1
        failed = self._failed_jobs.get(params.get("job", ""))
        if failed is not None:
            return self._answer_failed_job(req, kind, *failed)
        late = self.late_jobs.answer(kind, params.get("job"))
        if late is not None:
            return _send(req, late.status, late.content, late.content_type)
        rule = self._rule_for(kind, path, sql, body)
        if rule is not None and rule.delay:
            time.sleep(rule.delay)
        if rule is not None and rule.error is not None:
            with self._lock:
                self.faults[kind] += 1
            if rule.error.surface == "job" and kind == "jobs.insert":
                return self._fail_job(req, payload, rule.error)
            return _send(req, rule.error.http_status, rule.error.body())
        before = self._columns_before(kind, params, sql)
        types_before = self._types_before(params, sql)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP_BY_HOP}
        method, full_path = req.command, req.path

        def forward() -> Answer:
            if self.shape is not None:
                return self.shape.forward(method, full_path, kind, params, body, headers)
            r = self._http.request(method, self.upstream + full_path, content=body, headers=headers)
            return Answer(r.status_code, r.content, r.headers.get("content-type"))

        if kind == "jobs.insert":
            held = self.late_jobs.take(payload, sql, forward)
            if held is not None:
                return _send(req, held.status, held.content, held.content_type)
        try:
            upstream = forward()
        except httpx.TransportError:  # the emulator dropped the connection: drop the client's too
            req.close_connection = True
            return
        if kind == "jobs.list":
            upstream = self.late_jobs.listed(upstream, req.path.split("?", 1)[1] if "?" in req.path else "")
        answer = json_or_none(upstream.content)
        if upstream.status < 300 and isinstance(answer, dict):
            if kind.startswith("jobs."):
                with self._lock:
                    self.jobs.note(answer)
            if before is not None:
                self._note_added_columns(params, before, answer, sql)
            if types_before and self.schema is not None:
                for dataset, table, column, old in types_before:
                    self.schema.type_changed(dataset, table, column, old)
        _send(req, upstream.status, upstream.content, upstream.content_type)

    def _fail_job(self, req: BaseHTTPRequestHandler, payload: Any, error: GoogleError) -> None:
        """jobs.insert of a job that fails: 200 with the job DONE and its errorResult."""
        payload = payload if isinstance(payload, dict) else {}
        ref = dict(payload.get("jobReference") or {})
        ref.setdefault("jobId", f"fault_{int(time.time() * 1e6)}")
        ref.setdefault("location", "US")
        now_ms = str(int(time.time() * 1000))
        job = {
            "kind": "bigquery#job", "id": f"{ref.get('projectId', '')}:{ref['location']}.{ref['jobId']}",
            "jobReference": ref, "configuration": payload.get("configuration") or {},
            "status": {"state": "DONE", "errorResult": error.error_proto(), "errors": [error.error_proto()]},
            "statistics": {"creationTime": now_ms, "startTime": now_ms, "endTime": now_ms},
        }  # fmt: skip
        self._failed_jobs[ref["jobId"]] = (job, error)
        _send(req, 200, json.dumps(job).encode())

    def _answer_failed_job(self, req: BaseHTTPRequestHandler, kind: str, job: dict[str, Any], error: GoogleError) -> None:
        if kind == "jobs.get":
            return _send(req, 200, json.dumps(job).encode())
        _send(req, error.http_status, error.body())

    # ------------------------------------------------------------------ columns added
    def _columns_before(self, kind: str, params: dict[str, str], sql: str | None) -> set[str] | None:
        """The table's columns before a call that may add some (None: not such a call)."""
        if self.schema is None:
            return None
        if kind in ("tables.patch", "tables.update"):
            return self._columns(params["project"], params["dataset"], params["table"])
        if sql and _ALTER_ADD.search(sql):
            ref = _ALTER_ADD.search(sql)["ref"].strip("`").split(".")
            if len(ref) >= 2:
                return self._columns(params["project"], ref[-2], ref[-1])
        return None

    def _columns(self, project: str, dataset: str, table: str) -> set[str]:
        return set(self._column_types(project, dataset, table))

    def _column_types(self, project: str, dataset: str, table: str) -> dict[str, str]:
        path = f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}"
        r = self.shape.request("GET", path) if self.shape is not None else self._http.get(self.upstream + path)
        if r.status_code != 200:
            return {}
        return {f["name"].lower(): f.get("type", "") for f in (r.json().get("schema") or {}).get("fields", [])}

    def _types_before(self, params: dict[str, str], sql: str | None) -> list[tuple[str, str, str, str]]:
        """(dataset, table, column, type before) of each column an ALTER COLUMN ... SET DATA TYPE retypes."""
        if self.schema is None or not sql:
            return []
        out = []
        for m in _ALTER_TYPE.finditer(sql):
            ref = m["ref"].strip("`").split(".")
            if len(ref) >= 2:
                old = self._column_types(params["project"], ref[-2], ref[-1]).get(m["col"].lower())
                if old:
                    out.append((ref[-2], ref[-1], m["col"].lower(), old))
        return out

    def _note_added_columns(self, params: dict[str, str], before: set[str], answer: dict[str, Any], sql: str | None) -> None:
        assert self.schema is not None
        if "table" in params:
            after = {f["name"].lower() for f in (answer.get("schema") or {}).get("fields", [])}
            self.schema.columns_added(params["dataset"], params["table"], after - before)
            return
        for m in _ALTER_ADD.finditer(sql or ""):
            ref = m["ref"].strip("`").split(".")
            if len(ref) >= 2 and m["col"].lower() not in before:
                self.schema.columns_added(ref[-2], ref[-1], {m["col"].lower()})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def _proxy(self) -> None:
        self.server.proxy.handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _proxy

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str | None = None) -> None:
    req.send_response(status)
    req.send_header("Content-Type", content_type or "application/json; charset=UTF-8")
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _query_text(kind: str, payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    if kind == "jobs.query":
        return payload.get("query")
    if kind == "jobs.insert":
        return ((payload.get("configuration") or {}).get("query") or {}).get("query")
    return None
