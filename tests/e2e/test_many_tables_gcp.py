"""A many-table stream on the Google path drains to the end (issue 20): pstest -> subscriber
-> bqemulator through the Google-behaviour layer, 2,000 rows over 100 tables, 10 tables per
request. It once stalled after 37 rows: a connection per table, opened with no deadline of
ours. Scenario: `tests/support/faults/google_many_tables.py` (shared with `make bench`).
"""

from __future__ import annotations

import pytest

from app.settings import Settings

from tests.support.faults.google_many_tables import scenario_many_tables

pytestmark = [pytest.mark.emulator]


def test_two_thousand_rows_over_a_hundred_tables_land_exactly_once(tmp_path):
    o = scenario_many_tables(tmp_path, tables=100, rows=2000, tables_per_request=10, rows_per_request=100)
    assert o.lost == 0 and o.duplicated == 0 and o.landed == o.accepted == 2000, (o.row(), o.data)
    assert o.data["dead_letter_store"] == [] and o.data["gate_dead_lettered"] == []
    assert o.data["ordering_violations"] == []  # each table's messages acked in order
    assert o.data["readyz"] == 200
    # Storage Write connections bounded by the pool, not one per table; the server may
    # still count a connection being cancelled while its successor opens: + 1
    assert o.data["connections_peak"] <= Settings().bigquery_write_connections + 1, o.data
    assert o.data["tables_per_apply"] > 1  # the tables of a pull went to the warehouse together
