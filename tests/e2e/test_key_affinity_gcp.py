"""Issue 16, fencing between replicas: per-table order must not rest on key affinity that
Google does not document for the way we pull (tests/support/faults/replicas.py)."""

from __future__ import annotations

import pytest

from tests.support.faults import replicas

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def test_pubsub_without_key_affinity_a_later_message_of_a_key_served_to_another_replica_s_pull(tmp_path):
    o = replicas.scenario_no_key_affinity(tmp_path)
    assert len(o.data["subscribers"]) >= 2, o.data["subscribers"]  # both replicas were pulling
    # nothing healthy dead-lettered
    assert o.data["dead_letter_store"] == [], o.data["dead_letter_store"]
    assert o.data["dead_letter_topic"] == [], o.data["dead_letter_topic"]
    assert o.data["gate_dead_lettered"] == []
    # every accepted row present exactly once
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted, o.row()
    # per-table order: no message acked while an earlier one of its table was unacked
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]
