"""Bench section `gcp`: the Google path, API -> Pub/Sub (pstest) -> subscriber -> BigQuery (bqemulator).

Both processes run for real; the fault layer (`tests/support/fault_proxy`) sits in front of
the emulators with no fault armed, only to count: REST calls by API method, AppendRows
requests and connections, and the Pub/Sub ordering rules Google applies (pstest alone
does not enforce them, so messages per apply would be meaningless without them).

Measured:
- a mixed backlog (several tables, ~1% deletes) published while the subscriber is stopped,
  then drained: activities/s (subscriber healthy -> every message acked), messages per
  apply, API calls and query jobs per 10,000 activities;
- a one-table backlog of one-activity requests: messages per apply under ordering;
- bytes: `totalBytesProcessed` from the job statistics in the emulator's answers (bqemulator
  reports 0), the subscriber's own counters if its /metrics has any (`*bytes_processed*`,
  `*bytes_billed*`), the least Google would bill: 10 MB per query job other than DDL
  (on-demand minimum, https://cloud.google.com/bigquery/pricing#on_demand_pricing), and an
  estimate of what it would bill from the jobs' statements and the tables' sizes
  (`billing.py`: DML bills every column of each partition it changes);
- the same mixed backlog without deletes, into a fresh dataset: calls and bytes billed.
The prototype's pattern (per activity: list tables, an ALTER job, insertAll of one row;
one message per apply) runs through the same REST proxy on a sample.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

MIN_BILLED_PER_QUERY = 10 * 1024 * 1024
INSERTS_ONLY_DATASET = "bench_gcp_inserts"
_ACKED = re.compile(r"^pipeline_messages_acked_total (\S+)", re.M)
_BYTES = re.compile(r"^(\w*bytes_(?:processed|billed)\w*?)(?:_total)?(?:\{[^}]*\})? (\S+)", re.M)


def _messages_of(body: dict[str, Any]) -> int:
    from app.messages.codec import encode_batch
    from app.schema.validation import validate_batch

    return len(encode_batch(validate_batch(body, max_activities=10_000), uuid.uuid4().hex))


def _metric(p: Any, pattern: re.Pattern[str]) -> dict[str, float]:
    text = httpx.get(p.admin_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for m in pattern.finditer(text):
        name, value = (m.group(1), m.group(2)) if m.re.groups == 2 else ("acked", m.group(1))
        if name.endswith("_created"):  # prometheus_client's creation timestamp of a counter
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _drain(p: Any, expected_acked: float, timeout: float) -> float:
    """Start the subscriber; seconds from healthy until `expected_acked` messages are acked."""
    from tests.support.processes import wait_until

    p.start("subscriber")
    started = time.monotonic()
    wait_until(lambda: _metric(p, _ACKED).get("acked", 0) >= expected_acked, timeout=timeout, interval=0.2,
               what=f"{expected_acked:.0f} messages acked")
    return time.monotonic() - started


def _applies(p: Any, tables: set[str] | None = None) -> list[int]:
    from tests.support.faults.outcome import log_events

    return [int(e["messages"]) for e in log_events(p, "subscriber")
            if e.get("msg") == "applied" and "messages" in e and (tables is None or e.get("table") in tables)]


class _Counts:
    def __init__(self, rest: Any, storage_write: Any) -> None:
        self.rest, self.sw = rest, storage_write

    def reset(self) -> None:
        self.rest.reset_counts()
        self.sw.requests = self.sw.streams = 0

    def snapshot(self, activities: int) -> dict[str, Any]:
        rest = dict(self.rest.calls)
        query_jobs = sum(self.rest.statements.values())
        total = sum(rest.values()) + self.sw.requests
        per = 10_000 / max(1, activities)
        return {
            "rest_calls": rest, "append_rows_requests": self.sw.requests, "append_rows_connections": self.sw.streams,
            "calls_per_10k": total * per, "query_jobs_per_10k": query_jobs * per,
            "bytes_processed_per_10k": self.rest.bytes_processed * per,
            "query_jobs_by_statement": dict(self.rest.statements),
            "min_bytes_billed_per_10k": self.rest.billable_jobs * MIN_BILLED_PER_QUERY * per,
        }  # fmt: skip


def _mixed_backlog(p: Any, counts: _Counts, emu: Any, bodies: Any, activities: int) -> dict[str, Any]:
    """Publish `bodies` with the subscriber stopped, drain them; rates, calls, and the bytes
    Google would bill for the drain's query jobs (an estimate: `billing.py`)."""
    messages = 0
    for body in bodies:
        r = p.post(body)
        if r.status_code != 200:
            raise RuntimeError(f"bench body refused: {r.status_code} {r.text[:200]}")
        messages += _messages_of(body)
    counts.reset()
    since_ms = int(time.time() * 1000)
    seconds = _drain(p, messages, timeout=900)
    applies = _applies(p)
    run = {"activities": activities, "messages": messages, "seconds": seconds, "activities_per_s": activities / seconds,
           "applies": len(applies), "messages_per_apply": sum(applies) / max(1, len(applies)),
           **counts.snapshot(activities), "subscriber_byte_counters": _metric(p, _BYTES)}  # fmt: skip
    billed = _estimate_billing(emu, p.env["BIGQUERY_DATASET"], since_ms)
    run.update(estimated_bytes_billed_per_10k=billed["bytes"] * 10_000 / max(1, activities), billing_estimate=billed)
    return run


def _estimate_billing(emu: Any, dataset: str, since_ms: int) -> dict[str, Any]:
    """`billing.estimate` read through a proxy of its own (the counting one stays untouched)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    from scripts.bench import billing
    from tests.support.fault_proxy import BigQueryRestProxy

    with BigQueryRestProxy(emu.rest) as reads:
        client = bigquery.Client(project=emu.project, credentials=AnonymousCredentials(),
                                 client_options=ClientOptions(api_endpoint=f"http://{reads.address}"))
        try:
            return billing.estimate(client, dataset, since_ms)
        finally:
            client.close()


@contextlib.contextmanager
def counted_google_path(tmp: Path, dataset: str) -> Iterator[tuple[Any, _Counts, Any, Any, Any]]:
    """pstest and bqemulator behind the counting fault layer (no fault armed), the processes
    provisioned but not started: (pipeline, counts, emulator, REST proxy, Storage Write proxy)."""
    from tests.support.bqemulator import running_bqemulator
    from tests.support.fault_proxy import (
        BigQueryRestProxy,
        GrpcProxy,
        OrderingGate,
        SchemaVisibility,
        StorageWriteFaults,
    )
    from tests.support.fault_proxy.serial_grpc import SerialGrpcProxy
    from tests.support.processes import Pipeline
    from tests.support.pstest import running_pstest

    storage_write = StorageWriteFaults(SchemaVisibility())  # no lag: counts AppendRows only
    # the emulator takes one call at a time: the REST proxy and SerialGrpcProxy share its baton
    with running_bqemulator() as emu, running_pstest() as pstest, BigQueryRestProxy(emu.rest) as rest, \
            SerialGrpcProxy(emu.grpc) as serial, GrpcProxy(serial.address, storage_write=storage_write) as bq_grpc, \
            GrpcProxy(pstest, pubsub=OrderingGate()) as ps_grpc:
        p = Pipeline.create(tmp, BROKER="pubsub", WAREHOUSE="bigquery", GCP_PROJECT=emu.project,
                            PUBSUB_EMULATOR_HOST=ps_grpc.address, BIGQUERY_EMULATOR_HOST=rest.address,
                            BIGQUERY_EMULATOR_GRPC_HOST=bq_grpc.address, BIGQUERY_DATASET=dataset,
                            ACK_DEADLINE_SECONDS="60", LOG_LEVEL="INFO")  # fmt: skip
        try:
            provision(p)
            yield p, _Counts(rest, storage_write), emu, rest, bq_grpc
        finally:
            p.stop()


def provision(p: Any) -> None:
    prov = p.cli("provision")
    if prov.returncode != 0:
        raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")


def measure(tmp: Path, activities: int, per_body: int, one_table: int, proto_sample: int,
            prototype: Callable[[Any, int], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    from app.settings import Settings
    from scripts.bench import workload

    with counted_google_path(tmp / "gcp", "bench_gcp") as (p, counts, emu, rest, bq_grpc):
        p.start("api")
        # 1. mixed backlog (~1% deletes)
        mixed = _mixed_backlog(p, counts, emu, workload.mixed_bodies(activities, per_body, seed=5), activities)
        log(f"  pipeline, mixed backlog: {mixed['activities_per_s']:.0f} act/s, {mixed['messages_per_apply']:.1f} msgs/apply, "
            f"{mixed['calls_per_10k']:.0f} calls/10k, {mixed['query_jobs_per_10k']:.0f} query jobs/10k, "
            f"est. billed {mixed['estimated_bytes_billed_per_10k'] / 1e6:,.0f} MB/10k")
        # 2. one-table backlog (one activity per request)
        p.kill("subscriber", 15)
        for i in range(one_table):
            r = p.post({"user_activities": [{"operation": "insert", "table": "bench_one", "col_names": ["id", "v"],
                                             "col_types": ["integer", "string"], "col_values": [i, f"v{i}"]}]})  # fmt: skip
            if r.status_code != 200:
                raise RuntimeError(f"one-table body refused: {r.status_code} {r.text[:200]}")
        counts.reset()
        seconds_one = _drain(p, one_table, timeout=600)  # a new process: its counter starts at 0
        one = _applies(p, {"bench_one"})
        single = {"messages": one_table, "seconds": seconds_one, "applies": len(one),
                  "messages_per_apply": sum(one) / max(1, len(one)), **counts.snapshot(one_table)}  # fmt: skip
        log(f"  pipeline, one-table backlog of {one_table}: {single['messages_per_apply']:.1f} msgs/apply in {len(one)} applies")
        # 3. the same mixed backlog without deletes, into a fresh dataset (its tables' sizes are its own)
        p.kill("subscriber", 15)
        p.env["BIGQUERY_DATASET"] = INSERTS_ONLY_DATASET
        provision(p)
        inserts = _mixed_backlog(p, counts, emu, workload.mixed_bodies(activities, per_body, seed=5, delete_share=0.0),
                                 activities)
        log(f"  pipeline, mixed backlog without deletes: {inserts['calls_per_10k']:.0f} calls/10k, "
            f"{inserts['query_jobs_per_10k']:.0f} query jobs/10k, est. billed {inserts['estimated_bytes_billed_per_10k'] / 1e6:,.0f} MB/10k")
        p.stop()  # the prototype's calls are counted alone
        # 4. the prototype's pattern, through the same proxy
        counts.reset()
        settings = Settings(warehouse="bigquery", gcp_project=emu.project, bigquery_dataset="bench_gcp",
                            bigquery_emulator_host=rest.address, bigquery_emulator_grpc_host=bq_grpc.address)  # fmt: skip
        proto = prototype(settings, proto_sample)
        proto.update(counts.snapshot(proto["activities"]), activities_per_s=proto["activities"] / max(1e-9, proto["seconds"]),
                     messages_per_apply=1.0)  # fmt: skip
        log(f"  prototype pattern: {proto['activities_per_s']:.1f} act/s, {proto['calls_per_10k']:,.0f} calls/10k")
        return {"mixed": mixed, "inserts_only": inserts, "one_table": single, "prototype": proto}
