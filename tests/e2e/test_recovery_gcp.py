"""Issue 16's recovery scenarios on the Google path: permission denied everywhere for a
minute, a replica killed with its disk wiped after a rejection, one table's schema change
pending while another lands (`tests/support/faults/google_recovery.py`).

Each ends in the same assertion: every accepted row present exactly once, nothing
healthy dead-lettered, per-table order held.
"""

from __future__ import annotations

import pytest

from tests.support.faults import google_recovery
from tests.support.faults.outcome import Outcome

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def _refused_activities(entries: list[dict], kind_key: str, id_keys: tuple[str, str]) -> set[tuple]:
    """(dedup id, activity index) of the refused activities among dead letters; fails on anything else."""
    others = [e for e in entries if e.get(kind_key) != "activity"]
    assert others == [], f"whole messages dead-lettered: {others}"
    return {tuple(str(e.get(k)) for k in id_keys) for e in entries}


def _landed_once_in_order(o: Outcome, refused: int = 0) -> None:
    # every accepted row once ...
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # ... nothing healthy dead-lettered: only the `refused` activities, anywhere
    topic = _refused_activities(o.data["dead_letter_topic"], "dead_letter_kind",
                                ("dead_letter_dedup_id", "dead_letter_activity_index"))
    assert len(topic) == refused, o.data["dead_letter_topic"]
    store = _refused_activities(o.data["dead_letter_store"], "kind", ("dedup_id", "activity_index"))
    assert store <= topic, (store, topic)
    assert o.data["gate_dead_lettered"] == [], "Pub/Sub's dead-letter policy fired (too many delivery attempts)"
    # ... and per table in order: nothing acked while an earlier message of its key was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]


def test_permission_denied_on_every_bigquery_call_for_a_minute_blocks_and_then_everything_lands(tmp_path):
    o = google_recovery.scenario_permission_denied_everywhere(tmp_path)
    _landed_once_in_order(o)
    # not ready, and says why: /readyz, the gauge, the log
    during = o.data["readyz_during"]
    assert any(status == 503 and why.startswith("blocked: permission_denied") for status, why in during), during
    assert 1.0 in o.data["blocked_gauge_during"], o.data["blocked_gauge_during"]
    assert o.data["blocked_gauge_after"] == 0.0
    assert len(o.data["blocked_logged"]) >= 1 and o.data["unblocked_logged"] >= 1
    # both APIs refused calls (the Write API's refusal outlasts REST's by a few seconds)
    assert sum(o.data["faults"].values()) > 0, "no REST call was refused"
    assert sum(o.data["write_calls_refused"].values()) > 0, "no Storage Write call was refused"


def test_a_replica_killed_with_its_data_dir_wiped_after_a_rejection_loses_nothing(tmp_path):
    o = google_recovery.scenario_replica_wiped_after_rejection(tmp_path)
    assert [d["kind"] for d in o.data["local_before_kill"]] == ["activity"]  # refused on the first replica
    # ... but the dead-letter topic does: `dead-letters pubsub-list` shows the refused activity
    refused = [d for d in o.data["pubsub_list"] if d["kind"] == "activity"]
    assert refused and all(d["table"] == "wiped" for d in refused), o.data["pubsub_list"]
    assert all('"col_values":[199,7]' in d["data"].replace(" ", "") for d in refused), refused
    assert o.data["pubsub_list_again"] == o.data["pubsub_list"]
    assert o.data["conflict_rows"] == 0
    _landed_once_in_order(o, refused=1)


def test_a_table_whose_schema_change_is_pending_holds_up_no_other_table(tmp_path):
    o = google_recovery.scenario_schema_pending_other_table_lands(tmp_path)
    assert o.data["appends_refused_pending"] > 0, "the write stream never refused the new column"
    # when `other` had all its rows, `pending` still waited for its column and had none of its new rows
    assert o.data["other_landed"] is True, o.data
    assert o.data["column_hidden_then"] is True and o.data["pending_landed_then"] == 0, o.data
    assert o.data["notes_landed"] == 12
    _landed_once_in_order(o)


def test_a_waiting_table_s_backlog_of_many_pulls_holds_up_no_other_table(tmp_path):
    # PULL_MAX_MESSAGES=2: the stream's max_outstanding_messages is 4, and `pending`'s
    # backlog is 8 messages (4 x PULL_MAX_MESSAGES). Handed back with a delay held as an ack
    # deadline, they stayed outstanding and Pub/Sub sent `other` nothing while `pending`
    # waited; handed back at once, the retry policy spaces their redeliveries instead.
    o = google_recovery.scenario_schema_pending_other_table_lands(tmp_path, pending_messages=8, PULL_MAX_MESSAGES="2")
    assert o.data["appends_refused_pending"] > 0, "the write stream never refused the new column"
    assert o.data["other_landed"] is True, o.data
    assert o.data["column_hidden_then"] is True and o.data["pending_landed_then"] == 0, o.data
    assert o.data["redelivery_backoffs"] > 0, o.data
    assert o.data["notes_landed"] == 16
    _landed_once_in_order(o)


def test_a_table_whose_pending_messages_are_handed_back_keeps_its_order_with_small_pulls(tmp_path):
    # Runs of 2: the pending table's messages arrive while some of them are handed back
    # with a delay (still outstanding at Pub/Sub), and its later ones must wait for them.
    o = google_recovery.scenario_schema_pending_other_table_lands(tmp_path, PULL_MAX_MESSAGES="2")
    assert o.data["appends_refused_pending"] > 0, "the write stream never refused the new column"
    assert o.data["notes_landed"] == 12
    _landed_once_in_order(o)


def test_a_widened_column_the_write_stream_still_sees_with_its_old_type_lands_once(tmp_path):
    o = google_recovery.scenario_widened_type_not_yet_visible(tmp_path)
    assert o.data["retyped"] == {"score": "INTEGER"} or o.data["retyped"] == {"score": "INT64"}, o.data["retyped"]
    assert o.data["appends_refused_stale_type"] > 0, "the write stream never refused the widened column"
    assert o.data["scores"] == [(0, 0.0), (1, 10.0), (2, 20.0), (10, 0.5), (11, 1.5), (12, 2.5), (20, 0.0), (21, 1.0)]
    _landed_once_in_order(o)
