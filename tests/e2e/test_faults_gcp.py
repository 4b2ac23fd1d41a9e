"""Fault injection on the Google path, against the emulators (pstest, bqemulator).

Real processes; the emulator itself is stopped and started again on the same port.
Skipped with a reason when an emulator cannot run, except with CI=true (then they fail).
The Google-behaviour tests run through the fault layer (`tests/support/fault_proxy`).
Scenarios: `tests/support/faults/google.py` (shared with `scripts/reliability.py`).
"""

from __future__ import annotations

import pytest

from tests.support.faults import google
from tests.support.faults.outcome import Outcome

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def test_pubsub_emulator_stopped_gives_503_then_resumes_after_restart(tmp_path):
    o = google.scenario_pubsub_down(tmp_path)
    assert o.data["same_address"] is True
    during = {k: v for k, v in o.statuses.items() if not k.startswith("after:")}
    assert during == {"200": 1, "503": 4}, o.statuses  # never a 200 while it is down
    assert o.data["retry_after"] == ["1"]
    assert o.data["readyz_while_down"] == 503
    assert o.data["landed_503"] == []
    # The batch before the stop and the one after the restart both landed, once.
    assert o.lost == 0 and o.duplicated == 0 and o.landed == 10


def test_bigquery_emulator_stopped_backlog_waits_with_capped_backoff_then_drains(tmp_path):
    o = google.scenario_bigquery_down(tmp_path)
    assert o.statuses == {"200": 3}  # the API only needs the broker
    assert o.data["backlog_while_down"] >= 3
    delays, cap = o.data["delays"], o.data["backoff_max"]
    assert all(d <= cap for d in delays) and delays[-1] == cap, delays
    assert all(b >= a for a, b in zip(delays, delays[1:])), delays
    assert o.lost == 0 and o.duplicated == 0


# --- Google's documented behaviour, put back in front of the emulators (tests/support/fault_proxy)
# Every accepted row lands once and nothing healthy reaches a dead-letter place: not the
# dead-letter store, not the dead-letter topic (ours or the one Pub/Sub's policy feeds).


def _nothing_dead_lettered(o: Outcome) -> None:
    assert o.data["dead_letter_store"] == [], o.data["dead_letter_store"]
    assert o.data["dead_letter_topic"] == [], o.data["dead_letter_topic"]
    assert o.data["gate_dead_lettered"] == [], "Pub/Sub's dead-letter policy fired (too many delivery attempts)"


def _landed_once(o: Outcome) -> None:
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # and per ordering key (table) in order: nothing acked while an earlier message of its key was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]


@pytest.mark.parametrize("reason", ["quotaExceeded", "rateLimitExceeded"])
def test_bigquery_403_quota_errors_are_waited_out_and_nothing_is_dead_lettered(tmp_path, reason):
    o = google.scenario_bigquery_quota(tmp_path, reason=reason)
    assert sum(o.data["faults"].values()) > 0, "the fault was never served"
    _nothing_dead_lettered(o)
    _landed_once(o)


def test_permission_denied_on_every_bigquery_call_blocks_the_subscriber_and_dead_letters_nothing(tmp_path):
    # issue 16: "PERMISSION_DENIED on every BigQuery call" (8 s here instead of 60 s)
    o = google.scenario_bigquery_permission_denied(tmp_path)
    assert sum(o.data["faults"].values()) > 0, "the fault was never served"
    during = o.data["readyz_during"]
    assert any(status == 503 and why.startswith("blocked: permission_denied") for status, why in during), during
    assert o.data["blocked_metric"] == 1  # the gauge is exported (back at 0 now)
    _nothing_dead_lettered(o)
    _landed_once(o)


def test_dml_queue_full_and_concurrent_update_are_retried_in_order(tmp_path):
    o = google.scenario_bigquery_dml_queue(tmp_path)
    assert sum(o.data["faults"].values()) == 5, o.data["faults"]  # every armed DML fault was hit
    _nothing_dead_lettered(o)
    # delete 0..2 then insert 1 again, in publish order
    assert o.data["ids"] == [1, 3, 4, 5, 50, 51]
    _landed_once(o)


def test_rows_with_a_new_column_wait_until_the_write_stream_sees_it(tmp_path):
    o = google.scenario_new_column_not_yet_visible(tmp_path)
    assert o.data["added"] == ["note"]
    assert sum(o.data["appends_refused"].values()) > 0, "no append was refused: the lag was never exercised"
    # the waiting table held up no other table (a 10 s lag against one apply of the other)
    assert o.data["other_landed_while_column_hidden"] is True, "the other table waited until `wide`'s column was visible"
    _nothing_dead_lettered(o)
    assert o.data["notes_landed"] == 4
    _landed_once(o)


def test_a_lease_that_expires_mid_apply_redelivers_and_still_lands_once(tmp_path):
    o = google.scenario_lease_expiry(tmp_path)
    assert o.data["leases_expired"] >= 1
    _nothing_dead_lettered(o)
    _landed_once(o)


def test_one_table_backlog_drains_with_many_messages_per_apply(tmp_path):
    o = google.scenario_one_table_backlog(tmp_path)
    _nothing_dead_lettered(o)
    _landed_once(o)
    assert o.data["messages_per_apply"] > 1, o.data  # not one message per warehouse round trip
