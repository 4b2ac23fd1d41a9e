"""Message codec cost, in process: encode per README-body request and decode of a
500-activity message, format 1 (JSON) against format 2 (Arrow IPC).

    .venv/bin/python scripts/bench/codec.py

Best of 5 repeats of timeit, microseconds per call (wall time: run it on a quiet machine).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import orjson  # noqa: E402
from workload import mixed_bodies, readme_batch, readme_body  # noqa: E402

from app.broker.base import ReceivedMessage  # noqa: E402
from app.pipeline.codec import decode_message, encode_runs, json_body  # noqa: E402
from app.schema.columnar import runs_of  # noqa: E402
from app.schema.validation import validate_batch  # noqa: E402


def _per_call_us(fn: Callable[[], Any], seconds: float = 1.0) -> float:
    """Best of 5 repeats, each about `seconds` / 5 long, in microseconds per call."""
    number = max(1, int(seconds / 5 / max(1e-7, timeit.timeit(fn, number=10) / 10)))
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def _v1_messages(activities, batch_id: str) -> list[bytes]:
    by_table: dict[str, list] = {}
    for a in activities:
        by_table.setdefault(a.table, []).append(a)
    return [json_body(batch_id, table, acts) for table, acts in by_table.items()]


def _received(data: bytes) -> ReceivedMessage:
    return ReceivedMessage("1", data, {"dedup_id": "b:t:0"}, "t", 1)


def measure() -> dict[str, float]:
    readme = validate_batch(orjson.loads(readme_body()), max_activities=10)
    runs = runs_of(readme)
    out = {
        "encode_readme_v1_us": _per_call_us(lambda: _v1_messages(readme, "bid")),
        "encode_readme_v2_us": _per_call_us(lambda: encode_runs(runs, "bid")),
        "runs_of_readme_us": _per_call_us(lambda: runs_of(readme)),
    }
    for name, body in (("readme500", readme_batch(500)), ("mixed500", orjson.dumps(next(mixed_bodies(500, 500, seed=3))))):
        acts = validate_batch(orjson.loads(body), max_activities=1000)
        table = acts[0].table
        acts = [a for a in acts if a.table == table]
        v1 = _received(_v1_messages(acts, "bid")[0])
        v2 = _received(encode_runs(runs_of(acts), "bid")[0].data)
        out[f"decode_{name}_rows"] = len(acts)
        out[f"decode_{name}_v1_us"] = _per_call_us(lambda: decode_message(v1))
        out[f"decode_{name}_v2_us"] = _per_call_us(lambda: decode_message(v2))
        out[f"decode_{name}_v2_materialized_us"] = _per_call_us(lambda: decode_message(v2).activities)
        out[f"{name}_bytes_v1"] = len(v1.data)
        out[f"{name}_bytes_v2"] = len(v2.data)
    return out


if __name__ == "__main__":
    for key, value in measure().items():
        print(f"{key:40s} {value:12,.1f}")
