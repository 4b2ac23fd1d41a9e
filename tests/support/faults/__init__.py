"""Fault scenarios against the real processes, shared by the fault tests and the report.

Each `scenario_*` function starts what it needs (API and subscriber processes through
`tests.support.processes.Pipeline`, lockers, emulators), injects one fault, lets the
pipeline recover by itself, and returns an `Outcome`: what was sent, accepted, landed,
lost and duplicated, how long recovery took, plus scenario-specific facts in `data`.

The functions never assert: `tests/e2e/test_faults.py` (and `test_faults_gcp.py`)
assert on the outcome, `scripts/reliability.py` writes it to `docs/reliability.md`.
Recovery times are measured for the report only; tests never assert on them.

Modules: `local` (the embedded default's scenarios, `LOCAL_SCENARIOS`), `google` (Pub/Sub
and BigQuery through the emulators and the fault layer, `GCP_SCENARIOS`), `outcome` (the
`Outcome` record and the checks that read what landed), `harness` (bodies, posting,
starting the processes).
"""
