"""Issue 17 on the Google path: kill -9 of the subscriber during an upsert storm leaves
every key with its last value, once (tests/support/faults/google_upsert.py)."""

from __future__ import annotations

import pytest

from tests.support.faults import google_upsert

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def test_subscriber_kill9_during_an_upsert_storm_leaves_every_key_with_its_last_value_once(tmp_path):
    o = google_upsert.scenario_upsert_storm_kill9(tmp_path)
    assert o.data["kills"] >= 4
    assert o.data["errors"] == [], o.data["errors"][:3]
    for table, wanted in o.data["wanted"].items():
        rows = o.data["rows"][table]
        # one row per key, each at its last version: a message applied twice or out of
        # order would bring an older version back, or a deleted key to life
        assert [(k, v) for k, v, _ in rows] == wanted, table
        assert all(note == f"v{v}" for _, v, note in rows), table
    # nothing dead-lettered, anywhere
    assert o.data["dead_letter_store"] == [] and o.data["dead_letter_topic"] == [], o.data["dead_letter_store"]
    assert o.data["gate_dead_lettered"] == []
    assert o.data["ordering_violations"] == [], o.data["ordering_violations"]
