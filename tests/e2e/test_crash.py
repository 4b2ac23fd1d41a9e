"""kill -9 the subscriber repeatedly while activities stream in: none lost, none doubled."""

from __future__ import annotations

import random
import signal
import threading

import pytest

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
    rng = random.Random(7)
    kills = 0
    try:
        while producer.is_alive() or kills < 5:
            threading.Event().wait(rng.uniform(0.3, 1.2))
            p.kill("subscriber", signal.SIGKILL)
            kills += 1
            p.start("subscriber")
        producer.join()
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
