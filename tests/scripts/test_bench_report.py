"""`make bench` sets each figure against its target and same-run baselines, and renders the report."""

from __future__ import annotations

import subprocess
import sys

import orjson

from scripts.bench.evaluate import TARGETS, evaluate
from tests.support.processes import ROOT


def drain(rows_per_s: float, rss_mb: float = 100.0) -> dict:
    return {
        "activities": 1_000_000, "rows_per_s": rows_per_s, "seconds": 1_000_000 / rows_per_s, "sub_peak_rss_mb": rss_mb,
        "ceiling": {"rows_per_s": 800_000.0, "from_lists_rows_per_s": 400_000.0},
        "row_at_a_time": {"rows_per_s": 2_000.0},
    }


def verdicts(results: dict) -> dict[str, str]:
    return {row["target"].split(":")[-1].strip(): row["verdict"] for row in evaluate(results)}


def test_drain_verdicts_follow_the_targets():
    assert verdicts({"drain": drain(TARGETS["2_rows"], rss_mb=TARGETS["4_sub_rss_mb"])}) == {
        ">= 200,000 rows/s": "PASS",
        ">= 0.25x raw Arrow append ceiling": "PASS",  # 200k of an 800k ceiling: exactly 0.25x
        "4 subscriber peak RSS <= 250 MB (during 2)": "PASS",
    }
    assert set(verdicts({"drain": drain(TARGETS["2_rows"] - 1, rss_mb=251.0)}).values()) == {"MISS"}


def test_the_scoped_key_verdict_is_the_ratio_of_cpu_per_request_against_the_target():
    [passed] = evaluate({"keys": {"plain_us": 38.0, "scoped_us": 40.0}})  # 0.95x
    [missed] = evaluate({"keys": {"plain_us": 38.0, "scoped_us": 42.0}})
    assert (passed["verdict"], passed["ratio"], missed["verdict"]) == ("PASS", "0.950x", "MISS")
    # The app's own share is shown beside the whole request's, unjudged.
    _, app_only = evaluate({"keys": {"plain_us": 60.0, "scoped_us": 61.0}, "keys_app": {"plain_us": 38.0, "scoped_us": 42.0}})
    assert (app_only["verdict"], app_only["ratio"]) == ("n/a", "0.905x")
    # Measured in several processes: the median of their paired ratios is the figure, each one shown.
    [median] = evaluate({"keys": {"plain_us": 60.0, "scoped_us": 58.0, "ratio": 0.94, "ratios": [0.93, 0.94, 0.97]}})
    assert (median["verdict"], median["ratio"]) == ("MISS", "0.940x") and "0.930, 0.940, 0.970x" in median["baseline"]


def test_missing_sections_give_no_rows_and_errors_are_reported_unjudged():
    assert evaluate({}) == []
    [row] = evaluate({"gcp": {"error": "not measured: pstest unavailable"}})
    assert row["verdict"] == "n/a" and "pstest unavailable" in row["measured"]


def test_report_renders_from_saved_results(tmp_path):
    saved = tmp_path / "results.json"
    saved.write_bytes(orjson.dumps({"drain": drain(300_000.0)}))
    out = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, "-m", "scripts.bench", "--from-json", str(saved), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = out.read_text()
    assert "| 2 drain 1,000,000 activities: >= 200,000 rows/s | 300,000 rows/s (3.3 s) |" in report
    assert out.with_suffix(".png").stat().st_size > 0
    assert "2 drain 1,000,000 activities: >= 200,000 rows/s" in run.stdout


def test_the_upsert_drain_is_judged_as_a_ratio_to_the_insert_drain():
    def upsert(ratio: float) -> dict:
        side = {"rows": 100_000, "seconds": 1.0, "rows_per_s": 100_000.0, "table": 10_000}
        return {"upsert": {"insert": side, "upsert": {**side, "rows_per_s": 100_000.0 * ratio}, "keys": 10_000,
                           "ratio": ratio, "ratio_range": [ratio, ratio]}}

    assert list(verdicts(upsert(TARGETS["8_upsert_vs_insert"])).values()) == ["PASS"]
    assert list(verdicts(upsert(TARGETS["8_upsert_vs_insert"] - 0.01)).values()) == ["MISS"]


def test_upserts_on_the_google_path_are_reported_unjudged_next_to_inserts_of_the_same_rows():
    def run(mb: float, calls: float, jobs: dict[str, int]) -> dict:
        return {"activities": 10_000, "calls_per_10k": calls, "estimated_bytes_billed_per_10k": mb * 1e6,
                "billing_estimate": {"jobs_by_statement": jobs, "bytes_by_statement": {w: mb * 1e6 / len(jobs) for w in jobs}}}

    [row] = evaluate({"gcp_upsert": {"rows": 10_000, "keys": 1_000, "per_request": 500,
                                     "insert": run(100.0, 50.0, {"SELECT": 10}),
                                     "upsert": run(300.0, 70.0, {"SELECT": 10, "MERGE": 20})}})
    assert (row["verdict"], row["ratio"]) == ("n/a", "3.0x")
    assert row["measured"].startswith("300 MB, 70 calls (20 MERGE jobs 150 MB, 10 SELECT jobs 150 MB)")
    assert row["baseline"].startswith("inserts of the same rows: 100 MB, 50 calls")
