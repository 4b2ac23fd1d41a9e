"""Fault injection on the Google path, against the emulators (pstest, bqemulator).

Real processes; the emulator itself is stopped and started again on the same port.
Skipped with a reason when an emulator cannot run, except with CI=true (then they fail).
Scenarios: `tests/support/faults.py` (shared with `scripts/reliability.py`).
"""

from __future__ import annotations

import pytest

from tests.support import faults

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def test_pubsub_emulator_stopped_gives_503_then_resumes_after_restart(tmp_path):
    o = faults.scenario_pubsub_down(tmp_path)
    assert o.data["same_address"] is True
    during = {k: v for k, v in o.statuses.items() if not k.startswith("after:")}
    assert during == {"200": 1, "503": 4}, o.statuses  # never a 200 while it is down
    assert o.data["retry_after"] == ["1"]
    assert o.data["readyz_while_down"] == 503
    assert o.data["landed_503"] == []
    # The batch before the stop and the one after the restart both landed, once.
    assert o.lost == 0 and o.duplicated == 0 and o.landed == 10


def test_bigquery_emulator_stopped_backlog_waits_with_capped_backoff_then_drains(tmp_path):
    o = faults.scenario_bigquery_down(tmp_path)
    assert o.statuses == {"200": 3}  # the API only needs the broker
    assert o.data["backlog_while_down"] >= 3
    delays, cap = o.data["delays"], o.data["backoff_max"]
    assert all(d <= cap for d in delays) and delays[-1] == cap, delays
    assert all(b >= a for a, b in zip(delays, delays[1:])), delays
    assert o.lost == 0 and o.duplicated == 0
