"""kill -9 the subscriber repeatedly while activities stream in: none lost, none doubled."""

from __future__ import annotations

import random
import threading

import pytest

from tests.support.faults.harness import UpsertStorm, kill_subscriber_while
from tests.support.processes import Pipeline, wait_until

TOTAL = 20_000
PER_REQUEST = 100


@pytest.mark.slow
def test_subscriber_kill9_loses_and_duplicates_nothing(tmp_path):
    p = Pipeline.create(tmp_path, ACK_DEADLINE_SECONDS="3", PULL_MAX_MESSAGES="50")
    p.start("api")
    p.start("subscriber")
    accepted: list[int] = []
    errors: list[str] = []

    def produce() -> None:
        for start in range(0, TOTAL, PER_REQUEST):
            ids = list(range(start, start + PER_REQUEST))
            body = {"user_activities": [
                {"operation": "insert", "table": "stream", "col_names": ["id", "note"],
                 "col_types": ["integer", "string"], "col_values": [i, f"row {i}"]} for i in ids]}
            r = p.post(body)
            if r.status_code == 200:
                accepted.extend(ids)
            else:
                errors.append(r.text)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        kills = kill_subscriber_while(p, producer, random.Random(7), at_least=5, pause=(0.3, 1.2))
        assert not errors, errors[:3]
        assert len(accepted) == TOTAL
        wait_until(lambda: p.query("SELECT count(*) FROM stream")[0][0] >= TOTAL, timeout=180, what="all rows")
        # Give redeliveries of leases held by killed processes time to show up if they were doubled.
        wait_until(lambda: p.stats()["messages_acked"] >= 0 and _backlog_empty(p), timeout=60, what="empty backlog")
        assert p.query("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM stream") == [(TOTAL, TOTAL, 0, TOTAL - 1)]
    finally:
        p.stop()
    assert kills >= 5


def _backlog_empty(p: Pipeline) -> bool:
    import httpx

    text = httpx.get(p.admin_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("broker_backlog_messages "):
            return float(line.split()[1]) == 0
    return False


@pytest.mark.slow
def test_subscriber_kill9_during_many_table_applies_keeps_every_row_once_and_in_order(tmp_path):
    """Each request spreads over 20 of 60 tables, so every apply spans many tables in one
    transaction; the subscriber is killed in the middle of them. Each table ends with
    every accepted row exactly once, and its `seq` column shows the publish order held
    (a later activity of a table never applied before an earlier one: an earlier row
    deleted by a later activity would come back otherwise)."""
    tables, per_table_request, requests = 60, 20, 150
    p = Pipeline.create(tmp_path, ACK_DEADLINE_SECONDS="3", PULL_MAX_MESSAGES="200")
    p.start("api")
    p.start("subscriber")
    errors: list[str] = []
    expected: dict[str, set[int]] = {}

    def produce() -> None:
        for r in range(requests):
            acts = []
            for j in range(per_table_request):
                table = f"mt{(r * per_table_request + j) % tables:02d}"
                acts.append({"operation": "insert", "table": table, "col_names": ["seq", "req"],
                             "col_types": ["integer", "integer"], "col_values": [r * 100 + j, r]})
                if r % 10 == 9:  # a later delete of this table's row from the previous request
                    acts.append({"operation": "delete", "table": table, "col_names": ["req"],
                                 "col_types": ["integer"], "col_values": [r - 1]})
            resp = p.post({"user_activities": acts})
            if resp.status_code != 200:
                errors.append(resp.text)
                continue
            for a in acts:
                rows = expected.setdefault(a["table"], set())
                if a["operation"] == "insert":
                    rows.add(a["col_values"][0])
                else:
                    rows -= {s for s in rows if s // 100 == a["col_values"][0]}

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        kills = kill_subscriber_while(p, producer, random.Random(11), at_least=4, pause=(0.3, 1.0))
        assert not errors, errors[:3]
        total = sum(len(rows) for rows in expected.values())
        count_sql = " UNION ALL ".join(f"SELECT count(*) FROM {t}" for t in sorted(expected))
        wait_until(lambda: sum(n for (n,) in p.query(count_sql)) == total and _backlog_empty(p), timeout=180,
                   what="every table's rows")
        for table, rows in expected.items():
            got = [seq for (seq,) in p.query(f"SELECT seq FROM {table} ORDER BY seq")]
            assert got == sorted(rows), table
    finally:
        p.stop()
    assert kills >= 4


@pytest.mark.slow
def test_subscriber_kill9_during_an_upsert_storm_leaves_every_key_with_its_last_value_once(tmp_path):
    """Upserts (some as inserts on the keyed table, now and then a delete) of 400 keys,
    each carrying a rising `version`; the subscriber is killed in the middle. Every key
    ends as its last activity left it, in one row: a message applied twice, or out of
    order, would bring an older version back or a deleted key to life."""
    keys, per_request, requests = 400, 200, 120
    p = Pipeline.create(tmp_path, ACK_DEADLINE_SECONDS="3", PULL_MAX_MESSAGES="50")
    p.start("api")
    p.start("subscriber")
    storm = UpsertStorm(["current"], keys, per_request, seed=17)

    producer = threading.Thread(target=storm.produce, args=(p.post, requests))
    producer.start()
    try:
        kills = kill_subscriber_while(p, producer, random.Random(19), at_least=4, pause=(0.3, 1.0))
        assert not storm.errors, storm.errors[:3]
        wanted = storm.wanted("current")

        wait_until(lambda: p.query("SELECT count(*), CAST(coalesce(sum(version), 0) AS BIGINT) FROM current")
                   == [(len(wanted), sum(v for _, v in wanted))] and _backlog_empty(p), timeout=180, what="every key")
        assert p.query("SELECT k, version FROM current ORDER BY k") == wanted
        assert p.query("SELECT count(*) FROM current WHERE note <> 'v' || version") == [(0,)]
    finally:
        p.stop()
    assert kills >= 4
