"""Fault injection against the real processes (embedded default: SQLite broker, DuckDB).

The scenarios live in `tests/support/faults/local.py` (shared with `scripts/reliability.py`,
which writes `docs/reliability.md`); these tests assert on what they return. Nothing is
mocked: processes are SIGKILLed, files are locked by other processes. No assertion is
on timing: recovery times are only measured for the report.
"""

from __future__ import annotations

import pytest

from tests.support.faults import local


@pytest.mark.slow
def test_subscriber_kill9_ten_times_during_100k_stream(tmp_path):
    o = local.scenario_subscriber_kill9(tmp_path)
    assert o.data["kills"] == 10
    assert o.statuses == {"200": 200}, o.statuses  # the API kept accepting throughout
    assert o.accepted == o.sent == 100_000
    # Exactly the accepted rows: count and distinct ids, nothing else, nothing twice.
    assert o.data["count"] == o.data["distinct"] == 100_000
    assert (o.data["min_id"], o.data["max_id"]) == (0, 99_999)
    assert o.lost == 0 and o.duplicated == 0 and o.data["unaccepted_landed"] == 0


@pytest.mark.slow
def test_api_kill9_under_concurrent_load_no_partial_batch(tmp_path):
    o = local.scenario_api_kill9(tmp_path)
    assert o.data["kills"] >= 3
    assert o.data["failed_batches"] > 0, "the kills should have broken some requests"
    assert o.data["ok_batches"] > 0
    # Every 200 is wholly in; no batch (with or without a 200) is partly in.
    assert o.data["accepted_missing"] == []
    assert o.data["partial_batches"] == []
    assert o.data["unknown_markers"] == []
    assert o.lost == 0 and o.duplicated == 0


def test_broker_locked_answers_503_then_resumes_by_itself(tmp_path):
    o = local.scenario_broker_locked(tmp_path)
    during = {k: v for k, v in o.statuses.items() if not k.startswith("after:")}
    assert during == {"200": 1, "503": 6}, o.statuses  # the batch before the lock, then only 503s
    assert o.data["retry_after"] == ["1"]
    assert o.data["body_503"]["error"] is True
    assert o.data["landed_503"] == []  # a 503 means nothing of the batch was accepted
    assert o.data["readyz_while_locked"] == 503  # readiness tells the load balancer too
    assert o.lost == 0 and o.duplicated == 0
    assert o.recovery_seconds is not None  # a 200 came back without restarting anything


def test_backpressure_stalled_broker_sheds_load_with_503(tmp_path):
    o = local.scenario_backpressure(tmp_path)
    # Every request of every burst is refused with 503 + Retry-After: none hangs (the
    # client's timeout would show up as an error name), none is buffered and accepted later.
    assert o.statuses == {"503": 3 * 150}, o.statuses
    assert o.data["retry_after"] == {"1": 3 * 150}
    assert o.data["burst_landed"] == 0
    # Memory does not grow with the number of refused requests: the third burst costs
    # about what the first did (no queue keeps them).
    first, third = o.data["rss_mib"][1], o.data["rss_mib"][3]
    assert third - first < 64, o.data["rss_mib"]
    assert o.lost == 0


def test_duckdb_locked_backlog_waits_with_capped_backoff_then_drains(tmp_path):
    o = local.scenario_duckdb_locked(tmp_path)
    assert o.statuses == {"200": 5}
    # While locked: nothing acked, everything waits in the broker, readiness names the warehouse.
    assert o.data["acked_while_locked"] == 0
    assert o.data["backlog_while_locked"] == 5
    assert o.data["readyz_status"] == 503
    assert "lock" in o.data["readyz"]["warehouse"].lower() and o.data["readyz"]["broker"] == "ok"
    # Capped exponential backoff, read from the subscriber's JSON logs.
    delays, cap = o.data["delays"], o.data["backoff_max"]
    assert len(delays) >= 7
    assert all(d <= cap for d in delays), delays
    assert all(b >= a for a, b in zip(delays, delays[1:])), delays  # one outage: never shrinks
    assert delays[1] > delays[0] and delays[2] > delays[1]  # grows ...
    assert delays[-1] == delays[-2] == cap  # ... until the cap, and stays there
    # Afterwards everything drained, exactly once.
    assert o.data["ready_after"] == 200
    assert o.landed == o.accepted == 50 and o.lost == 0 and o.duplicated == 0


def test_poison_messages_are_dead_lettered_and_the_rest_flows(tmp_path):
    o = local.scenario_poison(tmp_path, max_attempts=3)
    letters = o.data["dead_letters"]
    by_table = {letter["table"]: letter for letter in letters}
    assert set(by_table) == {"garbage", "stuck", "conflict"}, letters
    garbage = by_table["garbage"]
    assert garbage["kind"] == "message" and "undecodable" in garbage["reason"]
    stuck = by_table["stuck"]  # keeps failing in the warehouse: dead-lettered after N attempts
    assert stuck["kind"] == "message" and stuck["attempts"] == 3 and "3 times" in stuck["reason"], stuck
    conflict = by_table["conflict"]  # can never apply: dead-lettered at once, with its reason
    assert conflict["kind"] == "activity" and "id" in conflict["reason"], conflict
    assert conflict["payload"]["col_values"] == ["x", "bad"]
    # Everything else landed, once; later rows of the stuck table were not blocked for good.
    counts = o.data["counts"]
    assert counts["later"] == (3, 3) and counts["ok"] == (1, 1) and "stuck" not in counts and "bad" not in counts
    assert sum(n for m, (n, _) in counts.items() if m.startswith("f")) == 60
    assert o.lost == 0 and o.duplicated == 0


def test_idempotency_key_retries_across_api_kills_create_no_duplicates(tmp_path):
    o = local.scenario_idempotent_retries(tmp_path)
    assert o.data["batch_ids_per_key"] == 1  # every retry got the original batch id
    assert o.statuses["replayed"] >= 30  # each batch's second send was a replay
    assert o.data["replay_after_restart"] == (200, "true", True)
    assert o.data["wrong_counts"] == {}
    assert o.data["repub"] == (5, 5)  # re-published chunk (same dedup_id) applied once
    assert o.landed == o.accepted and o.lost == 0 and o.duplicated == 0
