"""A many-table stream on the Google path (pstest -> subscriber -> bqemulator, through the
fault layer with no fault armed): each request spreads its rows over several tables, so
every request becomes several messages, one per table.

Shared by `tests/e2e/test_many_tables_gcp.py` (every row lands exactly once) and the bench
(`scripts/bench/gcp_many_tables.py`: the drain against one table with the same rows).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.faults.google import _metric_mean, _post_ok, google_stack
from tests.support.faults.harness import activity
from tests.support.faults.outcome import Outcome, timed
from tests.support.processes import wait_until

COLUMNS = (["id", "marker"], ["integer", "string"])


def bodies(tables: list[str], rows: int, tables_per_request: int, rows_per_request: int) -> list[dict[str, Any]]:
    """Requests of `rows_per_request` rows, each spread evenly over `tables_per_request` tables
    (taken round-robin). Row ids count up per table, so a table's rows arrive in id order."""
    per_table_chunk = rows_per_request // tables_per_request
    next_id = {t: 0 for t in tables}
    out: list[dict[str, Any]] = []
    table_at = 0
    for r in range(rows // rows_per_request):
        acts = []
        for _ in range(tables_per_request):
            t = tables[table_at % len(tables)]
            table_at += 1
            for _ in range(per_table_chunk):
                acts.append(activity("insert", t, *COLUMNS, [next_id[t], f"r{r}"]))
                next_id[t] += 1
        out.append({"user_activities": acts})
    return out


def row_counts(g: Any, tables: list[str]) -> dict[str, tuple[int, int]] | None:
    """table -> (rows, distinct ids), one query for all tables; None while a table is missing."""
    union = " UNION ALL ".join(f"SELECT '{t}' AS t, id FROM {g.table(t)}" for t in tables)
    got = g.query(f"SELECT t, count(*), count(DISTINCT id) FROM ({union}) GROUP BY t")
    return None if got is None else {t: (int(n), int(d)) for t, n, d in got}


def metric_total(p: Any, name: str) -> float:
    """A counter on the subscriber's /metrics, summed over its labels (0 if absent)."""
    text = httpx.get(p.admin_url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def write_rpcs(g: Any) -> dict[str, int]:
    """Storage Write calls by method, counted at the proxy (AppendRows: connections opened;
    its requests are `append_requests`)."""
    return {m.rsplit("/", 1)[1]: n for m, n in g.bq_grpc.calls.items() if "/google.cloud.bigquery.storage." in m}


@timed
def scenario_many_tables(
    tmp: Path, *, tables: int = 100, rows: int = 2000, tables_per_request: int = 10, rows_per_request: int = 100,
    timeout: float = 600, **env: str,
) -> Outcome:  # fmt: skip
    """`rows` rows over `tables` tables, posted as a backlog while the subscriber is stopped, then drained."""
    names = [f"mt_{i:04d}" for i in range(tables)]
    sent = bodies(names, rows, tables_per_request, rows_per_request)
    out = Outcome(
        f"{tables} tables on the Google path",
        f"{rows} rows over {tables} tables, {tables_per_request} tables per request of {rows_per_request} rows",
    )
    expected = {t: 0 for t in names}
    for body in sent:
        for act in body["user_activities"]:
            expected[act["table"]] += 1
    with google_stack(tmp, **env) as g:
        g.p.start("api")
        for body in sent:
            _post_ok(g.p, body)
        g.p.start("subscriber")
        started = time.monotonic()

        messages = sum(len({a["table"] for a in b["user_activities"]}) for b in sent)

        def drained() -> bool:
            counts = row_counts(g, names)
            return counts is not None and all(counts.get(t, (0, 0))[1] >= n for t, n in expected.items())

        try:
            # the subscriber's ack counter first (acks follow commits): a row count reads every
            # table on the emulator, whose calls are serialized with the subscriber's
            wait_until(
                lambda: metric_total(g.p, "pipeline_messages_acked_total") >= messages,
                timeout=timeout,
                interval=0.1,
                what=f"{messages} messages over {tables} tables to be acked",
            )
            out.data["drain_seconds"] = time.monotonic() - started  # reported by the bench only, never asserted
            wait_until(drained, timeout=timeout, interval=0.5, what=f"{rows} rows over {tables} tables to land")
        except AssertionError as exc:
            out.notes.append(str(exc))
            out.data.setdefault("drain_seconds", time.monotonic() - started)
        counts = row_counts(g, names) or {}
        out.sent = out.accepted = sum(expected.values())
        out.landed = sum(n for n, _ in counts.values())
        out.duplicated = sum(n - d for n, d in counts.values())
        out.lost = sum(max(0, n - counts.get(t, (0, 0))[1]) for t, n in expected.items())
        out.data.update(
            requests=len(sent), messages=messages,
            messages_per_apply=_metric_mean(g.p, "pipeline_messages_per_apply"),
            tables_per_apply=_metric_mean(g.p, "pipeline_tables_per_apply"),
            rest_calls=dict(g.rest.calls), query_jobs=sum(g.rest.statements.values()),
            bytes_processed=g.rest.bytes_processed, billable_jobs=g.rest.billable_jobs,
            append_requests=g.storage_write.requests, write_rpcs=write_rpcs(g), connections_opened=g.storage_write.streams,
            connections_peak=g.storage_write.peak_open, dead_letter_store=g.dead_letter_store(),
            gate_dead_lettered=list(g.gate.dead_lettered), ordering_violations=list(g.gate.violations),
            readyz=httpx.get(g.p.admin_url + "/readyz", timeout=10).status_code,
        )  # fmt: skip
        return out
