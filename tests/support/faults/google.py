"""Fault scenarios of the Google path: Pub/Sub and BigQuery emulators, and Google's behaviour in front of them."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from tests.support.faults.harness import activity, post_until_accepted, rows_body, start_pipeline, status_of
from tests.support.faults.outcome import (
    Outcome,
    backlog,
    dead_letters,
    log_events,
    marker_counts,
    retry_delays,
    timed,
    wait_backlog_empty,
)
from tests.support.processes import Pipeline, free_port, wait_until


# --------------------------------------------------------------------------- emulators stopped and restarted


@timed
def scenario_pubsub_down(tmp: Path, requests: int = 4, publish_timeout: float = 2.0) -> Outcome:
    """The Pub/Sub emulator stops; API answers 503; after a restart on the same port it resumes."""
    from tests.support.pstest import start_pstest

    out = Outcome("Pub/Sub emulator stopped", "pstest killed, then restarted on the same port (fresh state)")
    port = free_port()
    cm = start_pstest(port=port)
    address, proc = cm.__enter__()
    p = start_pipeline(tmp, BROKER="pubsub", PUBSUB_EMULATOR_HOST=address, GCP_PROJECT="fault-project",
                  PUBLISH_TIMEOUT_SECONDS=str(publish_timeout), ACK_DEADLINE_SECONDS="10", PROVISION_BIGQUERY="false")
    table = "psd"
    try:
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        p.start("subscriber")
        p.start("api")
        r = p.post(rows_body(table, 0, 5, "before"))
        out.statuses[str(r.status_code)] += 1
        wait_until(lambda: "before" in marker_counts(p, [table]), timeout=90, what="the first batch")
        proc.kill()
        proc.wait(timeout=10)
        retry_after = set()
        for i in range(requests):
            status, r = status_of(lambda: httpx.post(p.api_url + "/api-log/v1/", json=rows_body(table, 100 + i * 5, 5, f"down{i}"),
                                                      timeout=publish_timeout * 5 + 10))
            out.statuses[status] += 1
            if r is not None and r.status_code == 503:
                retry_after.add(r.headers.get("retry-after"))
        out.data["readyz_while_down"] = httpx.get(p.api_url + "/readyz", timeout=30).status_code
        cm.__exit__(None, None, None)
        cm = start_pstest(port=port)
        address2, proc = cm.__enter__()
        restarted = time.monotonic()
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"re-provision failed: {prov.stdout}{prov.stderr}")
        r, _, seen = post_until_accepted(lambda: httpx.post(
            p.api_url + "/api-log/v1/", json=rows_body(table, 1000, 5, "after"), headers={"Idempotency-Key": "psd-after"},
            timeout=30), timeout=120)
        out.recovery_seconds = time.monotonic() - restarted
        out.recovery_what = "emulator restarted (+ re-provisioned) -> first 200"
        out.statuses.update({f"after:{k}": v for k, v in seen.items()})
        wait_until(lambda: "after" in marker_counts(p, [table]), timeout=120, interval=0.5,
                   what="the batch after the restart to land (subscriber reconnects by itself)")
        counts = marker_counts(p, [table])
        out.sent = 5 * (2 + requests)
        out.accepted = 10
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(5 - counts.get(m, (0, 0))[1] for m in ("before", "after"))
        out.data.update(retry_after=sorted(x or "" for x in retry_after), same_address=address2 == address,
                        landed_503=sorted(m for m in counts if m.startswith("down")))
        out.notes.append("pstest keeps no state across a restart: topic and subscription are re-provisioned "
                         "(`python -m app provision`); the subscriber re-opens its streaming pull by itself")
    finally:
        p.stop()
        cm.__exit__(None, None, None)
    return out


RETRY_WINDOW_SECONDS = 90  # bigquery_down: at most the 10 s call deadline per attempt, 5 attempts, on a busy machine


@timed
def scenario_bigquery_down(tmp: Path, batches: int = 3, backoff_max: float = 1.0, min_retries: int = 5) -> Outcome:
    """The BigQuery emulator stops while batches wait; the subscriber retries with capped backoff."""
    from tests.support import bqemulator

    out = Outcome("BigQuery emulator stopped", "bqemulator killed while batches arrive, then a new one on the same ports")
    from tests.support.fault_proxy import BigQueryRestProxy
    from tests.support.fault_proxy.serial_grpc import SerialGrpcProxy

    emu_cm = bqemulator.running_bqemulator()
    emu = emu_cm.__enter__()
    # Google's shape, one call at a time; the proxies outlive the emulator's restart on the same ports
    rest, grpc_proxy = BigQueryRestProxy(emu.rest).start(), SerialGrpcProxy(emu.grpc).start()
    p = start_pipeline(tmp, WAREHOUSE="bigquery", BIGQUERY_EMULATOR_HOST=rest.address,
                  BIGQUERY_EMULATOR_GRPC_HOST=grpc_proxy.address,
                  GCP_PROJECT=emu.project, RETRY_BACKOFF_MAX_SECONDS=str(backoff_max), ACK_DEADLINE_SECONDS="5",
                  PROVISION_PUBSUB="false")
    table = "bqd"
    try:
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        p.start("subscriber")
        p.start("api")
        if p.post(rows_body(table, 0, 5, "before")).status_code != 200:
            raise RuntimeError("the batch before the fault was refused")
        wait_until(lambda: "before" in marker_counts(p, [table]), timeout=120, interval=0.5, what="the first batch")
        emu_cm.__exit__(None, None, None)
        emu_cm = None
        before = len(retry_delays(p))
        for b in range(batches):
            status, _ = status_of(lambda: p.post(rows_body(table, 100 + b * 5, 5, f"down{b}")))
            out.statuses[status] += 1
        try:
            # Each attempt against a stopped emulator spends the client's 10 s call deadline first.
            wait_until(lambda: len(retry_delays(p)) - before >= min_retries, timeout=RETRY_WINDOW_SECONDS, interval=0.3,
                       what=f"{min_retries} logged retries")
        except AssertionError:
            raise RuntimeError(
                f"the subscriber logged {len(retry_delays(p)) - before} backoff retries in {RETRY_WINDOW_SECONDS} s after the emulator "
                "stopped: it is blocked inside one BigQuery client call (google-cloud-bigquery's default retry "
                "goes on for up to 600 s), so it neither backs off with its own capped delays nor releases the "
                "warehouse lock that the admin port's /readyz also takes"
            ) from None
        out.data.update(backlog_while_down=backlog(p), readyz_while_down=httpx.get(p.admin_url + "/readyz", timeout=30).status_code)
        emu_cm = _bqemulator_on(emu)
        restarted = time.monotonic()
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"re-provision failed: {prov.stdout}{prov.stderr}")
        wait_backlog_empty(p, timeout=180)
        wait_until(lambda: all(f"down{b}" in marker_counts(p, [table]) for b in range(batches)), timeout=120,
                   interval=0.5, what="the batches sent while it was down")
        out.recovery_seconds = time.monotonic() - restarted
        out.recovery_what = "emulator restarted (+ re-provisioned) -> backlog drained into BigQuery"
        counts = marker_counts(p, [table])
        out.sent = 5 * (1 + batches)
        out.accepted = 5 * (1 + out.statuses["200"])
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(5 - counts.get(m, (0, 0))[1] for m in [f"down{b}" for b in range(batches)])
        out.data.update(delays=retry_delays(p)[before:], backoff_max=backoff_max)
        out.notes.append("the emulator is in-memory: rows from before the stop are gone with it; "
                         "only the batches sent while it was down are counted as lost/landed")
    finally:
        p.stop()
        rest.close()
        grpc_proxy.close()
        if emu_cm is not None:
            emu_cm.__exit__(None, None, None)
    return out


def _bqemulator_on(emu: Any):
    """Start bqemulator again on the same REST and gRPC ports; returns an entered context manager."""
    from tests.support import bqemulator

    rest_port = int(emu.rest.rsplit(":", 1)[1])
    grpc_port = int(emu.grpc.rsplit(":", 1)[1])
    ports = iter([rest_port, grpc_port])
    original = bqemulator._free_port
    bqemulator._free_port = lambda: next(ports)
    try:
        cm = bqemulator.running_bqemulator(emu.project)
        cm.__enter__()
    finally:
        bqemulator._free_port = original
    return cm


# --------------------------------------------------------------------------- Google's behaviour, in front of the emulators
#
# The fault layer (`tests/support/fault_proxy`) sits between the processes and pstest /
# bqemulator: BigQuery REST errors in Google's JSON shape, AppendRows refusing a new
# column for a while, Pub/Sub ordering keys enforced, leases that expire and delivery
# attempts counted with the subscription's dead-letter policy applied. Every fault is
# armed by count (or seconds), so the scenarios are deterministic and take seconds.

DEAD_LETTER_ATTEMPTS = 5  # Pub/Sub's minimum for a dead-letter policy
# Fault counts are at least DEAD_LETTER_ATTEMPTS: a pipeline that spends one delivery per
# transient error dead-letters healthy data; one that retries in place does not.


@dataclass
class GoogleStack:
    """The processes, wired to the emulators through the fault layer."""

    p: Pipeline
    pstest: str  # upstream pstest address (the dead-letter subscription is read there, past the gate)
    rest: Any  # fault_proxy.BigQueryRestProxy
    storage_write: Any  # fault_proxy.StorageWriteFaults
    gate: Any  # fault_proxy.OrderingGate
    bq_grpc: Any  # fault_proxy.GrpcProxy (Storage Write)
    ps_grpc: Any  # fault_proxy.GrpcProxy (Pub/Sub)
    dataset: str
    emulator: Any  # bqemulator.BqEmulator: the test's own reads go straight there, past the faults

    def table(self, name: str) -> str:
        return f"{self.dataset}.{name}"

    def query(self, sql: str) -> list[tuple] | None:
        """Rows of a query run on the emulator past the faults (through a rule-less proxy, in
        Google's shape and one call at a time with the stack's), None on error."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        from tests.support.fault_proxy import BigQueryRestProxy

        with BigQueryRestProxy(self.emulator.rest) as reads:
            client = bigquery.Client(project=self.emulator.project, credentials=AnonymousCredentials(),
                                     client_options=ClientOptions(api_endpoint=f"http://{reads.address}"))
            try:
                return [tuple(r.values()) for r in client.query_and_wait(sql)]
            except Exception:
                return None
            finally:
                client.close()

    def marker_counts(self, tables: list[str]) -> dict[str, tuple[int, int]]:
        """marker -> (rows, distinct ids) over the given tables of this stack's dataset."""
        out: dict[str, tuple[int, int]] = {}
        for t in tables:
            for m, n, d in self.query(f"SELECT marker, count(*), count(DISTINCT id) FROM {self.table(t)} GROUP BY marker") or []:
                n0, d0 = out.get(m, (0, 0))
                out[m] = (n0 + int(n), d0 + int(d))
        return out

    def dead_letter_store(self) -> list[dict[str, Any]]:
        return dead_letters(self.p)

    def dead_letter_topic(self) -> list[dict[str, str]]:
        """Messages on the dead-letter topic (read through its subscription, then released)."""
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        name = f"projects/{self.p.env['GCP_PROJECT']}/subscriptions/{self.p.env['PUBSUB_SUBSCRIPTION']}-dead-letter"
        client = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.pstest)))
        try:
            got = client.pull(request={"subscription": name, "max_messages": 1000}, timeout=10)  # pstest: waits 0.5 s at most
            ids = [m.ack_id for m in got.received_messages]
            if ids:
                client.modify_ack_deadline(request={"subscription": name, "ack_ids": ids, "ack_deadline_seconds": 0})
            return [dict(m.message.attributes) for m in got.received_messages]
        finally:
            client.close()

    def applied_messages(self, table: str) -> list[int]:
        """How many messages each logged apply of `table` carried, in order."""
        return [int(e["messages"]) for e in log_events(self.p, "subscriber")
                if e.get("msg") == "applied" and e.get("table") == table and "messages" in e]


@contextlib.contextmanager
def google_stack(tmp: Path, *, schema_lag_seconds: float = 0.0, expire_leases_after: float | None = None,
                 expiring_leases: int | None = None, key_affinity: bool = True, **env: str) -> Iterator[GoogleStack]:
    """pstest + a bqemulator of its own, the fault proxies in front, the processes provisioned but not started.

    Its own emulator: faults, lease expiries and restarts leave the emulator's state where
    the session's shared one must stay clean for the tests after.
    """
    from tests.support.bqemulator import running_bqemulator
    from tests.support.fault_proxy import (
        BigQueryRestProxy,
        GrpcProxy,
        OrderingGate,
        SchemaVisibility,
        StorageWriteFaults,
    )
    from tests.support.fault_proxy.serial_grpc import SerialGrpcProxy
    from tests.support.pstest import running_pstest

    with contextlib.ExitStack() as stack:
        emu = stack.enter_context(running_bqemulator())
        pstest = stack.enter_context(running_pstest())
        lag = SchemaVisibility(schema_lag_seconds)
        rest = stack.enter_context(BigQueryRestProxy(emu.rest, schema=lag))
        storage_write = StorageWriteFaults(lag)
        serial = stack.enter_context(SerialGrpcProxy(emu.grpc))  # one call at a time, with the REST proxy's
        bq_grpc = stack.enter_context(GrpcProxy(serial.address, storage_write=storage_write))
        gate = OrderingGate(expire_leases_after=expire_leases_after, expiring_leases=expiring_leases,
                            key_affinity=key_affinity)
        stack.callback(gate.close)
        ps_grpc = stack.enter_context(GrpcProxy(pstest, pubsub=gate))
        suffix = f"{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        dataset = f"faults_{suffix}"
        p = start_pipeline(
            tmp, BROKER="pubsub", WAREHOUSE="bigquery", GCP_PROJECT=emu.project,
            PUBSUB_EMULATOR_HOST=ps_grpc.address, PUBSUB_TOPIC=f"act-{suffix}", PUBSUB_SUBSCRIPTION=f"act-sub-{suffix}",
            BIGQUERY_EMULATOR_HOST=rest.address, BIGQUERY_EMULATOR_GRPC_HOST=bq_grpc.address, BIGQUERY_DATASET=dataset,
            ACK_DEADLINE_SECONDS="10", MAX_DELIVERY_ATTEMPTS=str(DEAD_LETTER_ATTEMPTS), RETRY_BACKOFF_MAX_SECONDS="1",
            **env,
        )  # fmt: skip
        stack.callback(p.stop)
        prov = p.cli("provision")
        if prov.returncode != 0:
            raise RuntimeError(f"provision failed: {prov.stdout}{prov.stderr}")
        rest.reset_counts()
        yield GoogleStack(p, pstest, rest, storage_write, gate, bq_grpc, ps_grpc, dataset, emu)


def _google_outcome(out: Outcome, g: GoogleStack, tables: list[str], expected: dict[str, int]) -> Outcome:
    """Fill landed/lost/duplicated from marker counts and the dead letters from both places."""
    counts = g.marker_counts(tables)
    out.sent = out.accepted = sum(expected.values())
    out.landed = sum(n for n, _ in counts.values())
    out.duplicated = sum(n - d for n, d in counts.values())
    out.lost = sum(max(0, want - counts.get(m, (0, 0))[1]) for m, want in expected.items())
    out.data.update(
        dead_letter_store=g.dead_letter_store(), dead_letter_topic=g.dead_letter_topic(),
        gate_dead_lettered=list(g.gate.dead_lettered), faults=dict(g.rest.faults), calls=dict(g.rest.calls),
        appends_refused=dict(g.storage_write.rejected), ordering_violations=list(g.gate.violations),
        leases_expired=g.gate.expired, late_acks=g.gate.late_acks,
    )  # fmt: skip
    d = out.data
    out.notes.append(
        f"faults served {sum(d['faults'].values())} {dict(d['faults'])}, appends refused {sum(d['appends_refused'].values())}, "
        f"leases expired {d['leases_expired']} (late acks dropped {d['late_acks']}); dead letters: store "
        f"{len(d['dead_letter_store'])}, topic {len(d['dead_letter_topic'])}, by Pub/Sub's policy {len(d['gate_dead_lettered'])}"
    )
    return out


def _post_ok(p: Pipeline, body: dict[str, Any]) -> None:
    r = p.post(body)
    if r.status_code != 200:
        raise RuntimeError(f"batch refused: {r.status_code} {r.text}")


def _wait_markers(g: GoogleStack, tables: list[str], expected: dict[str, int], timeout: float = 120) -> None:
    """Until every marker has its rows (or something reached a dead-letter place: stop early, report it)."""

    def done() -> bool:
        counts = g.marker_counts(tables)
        if all(counts.get(m, (0, 0))[1] >= n for m, n in expected.items()):
            return True
        return bool(g.gate.dead_lettered) or bool(g.dead_letter_store())

    try:
        wait_until(done, timeout=timeout, interval=0.5, what=f"markers {sorted(expected)} to land")
    except AssertionError:
        pass  # the outcome reports what is missing


def _metric_mean(p: Pipeline, name: str) -> float:
    """Mean of a Prometheus histogram/summary on the subscriber's /metrics (`_sum` / `_count`), 0 if absent."""
    text = httpx.get(p.admin_url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " ") or line.startswith(name + suffix + "{"):
                values[suffix] = values.get(suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return values["_sum"] / values["_count"] if values.get("_count") else 0.0


def _note_body(table: str, first_id: int, n: int, marker: str) -> dict[str, Any]:
    """n inserts that also carry a new column `note` (the table gets a column added)."""
    return {"user_activities": [
        activity("insert", table, ["id", "marker", "note"], ["integer", "string", "string"], [i, marker, f"n{i}"])
        for i in range(first_id, first_id + n)
    ]}


@timed
def scenario_bigquery_quota(tmp: Path, reason: str = "quotaExceeded", times: int = 6) -> Outcome:
    """BigQuery answers job and table calls with 403 quotaExceeded / rateLimitExceeded (Google's JSON)."""
    from tests.support.fault_proxy import errors

    error = errors.quota_exceeded() if reason == "quotaExceeded" else errors.rate_limit_exceeded()
    out = Outcome(f"BigQuery 403 {reason}", f"{times} job/table calls answered 403 {reason} in Google's error shape")
    table = "quota"
    with google_stack(tmp) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 5, "before"))
        _wait_markers(g, [table], {"before": 5})
        g.rest.add(error, errors.QUERY_KINDS | errors.TABLE_UPDATE_KINDS | {"tables.get", "tables.insert"}, times=times)
        _post_ok(g.p, _note_body(table, 100, 5, "during"))  # adds a column while the quota bites
        _post_ok(g.p, rows_body(table, 200, 5, "after"))
        expected = {"before": 5, "during": 5, "after": 5}
        _wait_markers(g, [table], expected)
        out.data["faults_left"] = sum(max(0, (r.times or 0) - r.hits) for r in g.rest.rules)
        return _google_outcome(out, g, [table], expected)


@timed
def scenario_bigquery_permission_denied(tmp: Path, seconds: float = 8.0) -> Outcome:
    """Every BigQuery REST call answers 403 accessDenied (a revoked role) for `seconds`."""
    from tests.support.fault_proxy import errors

    out = Outcome("BigQuery 403 accessDenied on every call",
                  f"every BigQuery call answered 403 accessDenied for {seconds:g} s, then allowed again")
    table = "denied"
    with google_stack(tmp) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 5, "before"))
        _wait_markers(g, [table], {"before": 5})
        rule = g.rest.add(errors.access_denied(), errors.ALL_KINDS, seconds=seconds)
        for n in range(3):
            _post_ok(g.p, rows_body(table, 100 + 10 * n, 5, f"during{n}"))
        readyz: list[tuple[int, str]] = []
        while not (rule.hits and rule.spent(time.monotonic())):
            r = httpx.get(g.p.admin_url + "/readyz", timeout=10)
            readyz.append((r.status_code, str(r.json().get("warehouse"))))
            time.sleep(0.3)
        expected = {"before": 5, "during0": 5, "during1": 5, "during2": 5}
        _wait_markers(g, [table], expected)
        wait_until(lambda: httpx.get(g.p.admin_url + "/readyz", timeout=10).status_code == 200, timeout=30,
                   interval=0.3, what="ready again")
        out.data["readyz_during"] = readyz
        out.data["blocked_metric"] = httpx.get(g.p.admin_url + "/metrics", timeout=10).text.count(
            'subscriber_blocked{reason="permission_denied"}')
        return _google_outcome(out, g, [table], expected)


@timed
def scenario_bigquery_dml_queue(tmp: Path, queue_full: int = 3, concurrent: int = 2) -> Outcome:
    """DELETE jobs fail with the DML queue's 400 resourcesExceeded, then with 'concurrent update'."""
    from tests.support.fault_proxy import errors

    out = Outcome("BigQuery DML queue full / concurrent update",
                  f"{queue_full} DELETE jobs answered 'Too many DML statements outstanding', {concurrent} 'Could not serialize access'")
    table = "dml"
    with google_stack(tmp) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(table, 0, 6, "base"))
        _wait_markers(g, [table], {"base": 6})
        g.rest.add(errors.dml_queue_full(table), errors.QUERY_KINDS, times=queue_full, sql=r"^\s*DELETE\b")
        g.rest.add(errors.concurrent_update(table), errors.QUERY_KINDS, times=concurrent, sql=r"^\s*DELETE\b")
        # Ordered on one key: delete ids 0-2, then insert id 1 again; the end state depends on order.
        for i in range(3):
            _post_ok(g.p, {"user_activities": [activity("delete", table, ["id"], ["integer"], [i])]})
        _post_ok(g.p, rows_body(table, 1, 1, "again"))
        _post_ok(g.p, rows_body(table, 50, 2, "tail"))
        _wait_markers(g, [table], {"again": 1, "tail": 2})
        ids = lambda: sorted(r[0] for r in g.query(f"SELECT id FROM {g.table(table)}") or [])  # noqa: E731
        try:
            wait_until(lambda: ids() == [1, 3, 4, 5, 50, 51] or bool(g.dead_letter_store()) or bool(g.gate.dead_lettered),
                       timeout=60, interval=0.5, what="the deletes to apply")
        except AssertionError:
            pass  # the outcome shows the ids
        out.data["ids"] = ids()
        return _google_outcome(out, g, [table], {"again": 1, "tail": 2, "base": 3})


@timed
def scenario_new_column_not_yet_visible(tmp: Path, lag_seconds: float = 10.0) -> Outcome:
    """A column is added; the write stream refuses rows carrying it for `lag_seconds` (SCHEMA_MISMATCH_EXTRA_FIELDS)."""
    out = Outcome("Storage Write: new column not yet visible",
                  f"AppendRows refuses rows with a just-added column for {lag_seconds:g} s, as Google's write stream does")
    wide, other = "wide", "other"
    with google_stack(tmp, schema_lag_seconds=lag_seconds) as g:
        g.p.start("subscriber")
        g.p.start("api")
        _post_ok(g.p, rows_body(wide, 0, 3, "before"))
        _wait_markers(g, [wide], {"before": 3})
        _post_ok(g.p, _note_body(wide, 100, 4, "with_note"))
        _post_ok(g.p, rows_body(other, 500, 3, "other"))
        _post_ok(g.p, rows_body(wide, 200, 2, "after_note"))
        expected = {"before": 3, "with_note": 4, "after_note": 2, "other": 3}
        _wait_markers(g, [other], {"other": 3}, timeout=60)
        # Did the other table go on while `wide` waited for its column? (no clock: the lag's own state)
        out.data["other_landed_while_column_hidden"] = bool(g.storage_write.visibility.hidden(g.dataset, wide, ["note"]))
        _wait_markers(g, [wide, other], expected)
        out.data["added"] = sorted(g.storage_write.visibility.added(g.dataset, wide))
        notes = g.query(f"SELECT count(*) FROM {g.table(wide)} WHERE note IS NOT NULL") or [(0,)]
        out.data["notes_landed"] = int(notes[0][0])
        return _google_outcome(out, g, [wide, other], expected)


@timed
def scenario_lease_expiry(tmp: Path, lease_seconds: float = 2.0, slow_seconds: float = 4.0) -> Outcome:
    """The first lease runs out while BigQuery is slow: the late ack is dropped and the message comes back."""
    out = Outcome("Pub/Sub lease expired during a slow apply",
                  f"first delivery's lease capped at {lease_seconds:g} s while a BigQuery call takes {slow_seconds:g} s")
    table = "lease_t"
    with google_stack(tmp, expire_leases_after=lease_seconds, expiring_leases=1) as g:
        g.p.start("subscriber")
        g.p.start("api")
        # the first call of the first apply that names the table (not the subscriber's start-up calls)
        g.rest.add(None, {"jobs.insert", "jobs.query", "tables.get", "tables.insert"}, times=1, delay=slow_seconds,
                   target=r"\blease_t\b")
        _post_ok(g.p, rows_body(table, 0, 5, "slow"))
        _post_ok(g.p, rows_body(table, 10, 5, "next"))
        expected = {"slow": 5, "next": 5}
        _wait_markers(g, [table], expected)
        # the redelivery and the late ack happen after the rows landed: give them a moment
        wait_until(lambda: g.gate.expired >= 1, timeout=30, interval=0.2, what="the lease to expire")
        time.sleep(2)
        return _google_outcome(out, g, [table], expected)


@timed
def scenario_one_table_backlog(tmp: Path, messages: int = 60) -> Outcome:
    """A backlog of one table (one message per request, published while the subscriber is stopped) drains."""
    out = Outcome("One-table backlog under ordering", f"{messages} messages for one table published while the subscriber is down")
    table = "backlog"
    with google_stack(tmp) as g:
        g.p.start("api")
        for i in range(messages):
            _post_ok(g.p, rows_body(table, i, 1, f"b{i}"))
        g.p.start("subscriber")
        expected = {f"b{i}": 1 for i in range(messages)}
        _wait_markers(g, [table], expected, timeout=240)
        applies = g.applied_messages(table)
        per_apply = (sum(applies) / len(applies)) if applies else _metric_mean(g.p, "pipeline_messages_per_apply")
        out.data.update(applies=len(applies), messages_per_apply=per_apply, max_per_pull=g.gate.max_messages_per_key_per_pull)
        return _google_outcome(out, g, [table], expected)


GCP_SCENARIOS: dict[str, Callable[[Path], Outcome]] = {
    "pubsub_down": scenario_pubsub_down,
    "bigquery_down": scenario_bigquery_down,
    "bigquery_quota": scenario_bigquery_quota,
    "bigquery_rate_limit": lambda tmp: scenario_bigquery_quota(tmp, reason="rateLimitExceeded"),
    "bigquery_dml_queue": scenario_bigquery_dml_queue,
    "new_column_not_yet_visible": scenario_new_column_not_yet_visible,
    "lease_expiry": scenario_lease_expiry,
    "one_table_backlog": scenario_one_table_backlog,
}
