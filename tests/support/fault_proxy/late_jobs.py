"""Query jobs that run late: Google accepts a job, and runs it when it can.

A mutating DML job can wait in a per-table queue (up to 20 per table) and run long after
the client stopped waiting for it
(https://cloud.google.com/bigquery/docs/data-manipulation-language#dml_statement_conflicts).
`LateJobs.hold(sql=..., seconds=...)` arms that: the next `jobs.insert` of matching SQL
is answered at once with the job PENDING, and the statement reaches the emulator only
`seconds` later. Until then the job is RUNNING to jobs.get, `jobComplete: false` to
jobs.getQueryResults, listed by jobs.list (stateFilter pending/running), and a
jobs.cancel does not stop it (Google: "the job might be completed before the cancel
request is processed", https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/cancel).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tests.support.fault_proxy.bq_shape import Answer


@dataclass
class _Armed:
    sql: re.Pattern[str]
    seconds: float
    times: int


@dataclass
class _Held:
    job: dict[str, Any]
    run: Callable[[], None]
    released: threading.Event = field(default_factory=threading.Event)


class LateJobs:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self._held: dict[str, _Held] = {}
        self.ran_late: list[str] = []  # job ids, in the order they reached the emulator

    def hold(self, sql: str, seconds: float, times: int = 1) -> None:
        with self._lock:
            self._armed.append(_Armed(re.compile(sql, re.IGNORECASE | re.DOTALL), seconds, times))

    @property
    def waiting(self) -> int:
        """Held jobs that have not reached the emulator yet."""
        with self._lock:
            return sum(not h.released.is_set() for h in self._held.values())

    def take(self, payload: Any, sql: str | None, forward: Callable[[], Answer]) -> Answer | None:
        """A jobs.insert to hold: its PENDING job, the statement run by `forward` later."""
        if not sql or not isinstance(payload, dict):
            return None
        with self._lock:
            armed = next((a for a in self._armed if a.times > 0 and a.sql.search(sql)), None)
            if armed is None:
                return None
            armed.times -= 1
        ref = dict(payload.get("jobReference") or {})
        ref.setdefault("jobId", f"late_{int(time.time() * 1e6)}")
        ref.setdefault("location", "US")
        now_ms = str(int(time.time() * 1000))
        job = {
            "kind": "bigquery#job", "id": f"{ref.get('projectId', '')}:{ref['location']}.{ref['jobId']}",
            "jobReference": ref, "configuration": payload.get("configuration") or {},
            "status": {"state": "PENDING"}, "statistics": {"creationTime": now_ms},
        }  # fmt: skip
        held = _Held(job, lambda: None)

        def run() -> None:
            forward()
            with self._lock:
                self.ran_late.append(ref["jobId"])
            held.released.set()

        timer = threading.Timer(armed.seconds, run)
        timer.daemon = True
        with self._lock:
            self._held[ref["jobId"]] = held
        timer.start()
        return Answer(200, json.dumps(job).encode())

    def answer(self, kind: str, job_id: str | None) -> Answer | None:
        """jobs.get / getQueryResults / cancel of a job still held; None: ask the emulator."""
        with self._lock:
            held = self._held.get(job_id or "")
        if held is None or held.released.is_set():
            return None
        job = {**held.job, "status": {"state": "RUNNING"}}
        if kind == "jobs.get":
            return Answer(200, json.dumps(job).encode())
        if kind == "jobs.cancel":
            return Answer(200, json.dumps({"kind": "bigquery#jobCancelResponse", "job": job}).encode())
        if kind == "jobs.getQueryResults":
            body = {"kind": "bigquery#getQueryResultsResponse", "jobReference": job["jobReference"], "jobComplete": False}
            return Answer(200, json.dumps(body).encode())
        return None

    def listed(self, answer: Answer, query: str) -> Answer:
        """jobs.list with the held jobs added (they are pending or running)."""
        state_filter = re.findall(r"stateFilter=(\w+)", query)
        if state_filter and not {"pending", "running"} & set(state_filter):
            return answer
        with self._lock:
            jobs = [{**h.job, "state": "RUNNING", "status": {"state": "RUNNING"}} for h in self._held.values() if not h.released.is_set()]
        if not jobs or answer.status != 200:
            return answer
        body = json.loads(answer.content or b"{}")
        if state_filter:  # the emulator's own jobs are all done
            body["jobs"] = [j for j in body.get("jobs", []) if j.get("state") != "DONE"]
        body["jobs"] = [*body.get("jobs", []), *jobs]
        return Answer(200, json.dumps(body).encode(), "application/json")
