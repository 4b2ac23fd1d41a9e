"""Message codec cost, in process: encode per README-body request and decode of a
500-activity message, format 1 (JSON) against format 2 (Arrow IPC).

    .venv/bin/python -m scripts.bench.codec

Best of 5 repeats of timeit, in microseconds of this process's CPU time per call (so
time lost to other processes on a shared machine is not counted). The format 1 encoder
is the one the API used before format 2, kept here for the comparison.
"""

from __future__ import annotations

import time
import timeit
from typing import Any, Callable

import orjson

from app.broker.base import OutgoingMessage, ReceivedMessage
from app.messages.codec import decode_message, dedup_id, encode_runs
from app.schema.columnar import runs_of
from app.schema.validation import validate_batch
from scripts.bench.workload import mixed_bodies, readme_batch, readme_body


def _per_call_us(fn: Callable[[], Any], seconds: float = 1.0) -> float:
    """Best of 5 repeats, each about `seconds` / 5 long, in CPU microseconds per call."""
    timer = timeit.Timer(fn, timer=time.process_time)
    number = max(1, int(seconds / 5 / max(1e-7, timer.timeit(number=10) / 10)))
    return min(timer.repeat(number=number, repeat=5)) / number * 1e6


def encode_v1(activities, batch_id: str) -> list[OutgoingMessage]:
    """Format 1 as the API wrote it (one JSON body per table; no chunking needed here)."""
    by_table: dict[str, list[dict]] = {}
    for a in activities:
        by_table.setdefault(a.table, []).append(
            {"operation": a.operation, "col_names": a.col_names, "col_types": a.col_types, "col_values": a.col_values}
        )
    return [
        OutgoingMessage(
            data=orjson.dumps({"v": 1, "batch_id": batch_id, "table": table, "activities": bodies}),
            ordering_key=table,
            attributes={
                "table": table,
                "count": str(len(bodies)),
                "batch_id": batch_id,
                "dedup_id": dedup_id(batch_id, table, 0),
            },
        )
        for table, bodies in by_table.items()
    ]


def _received(data: bytes) -> ReceivedMessage:
    return ReceivedMessage("1", data, {"dedup_id": "b:t:0"}, "t", 1)


def measure() -> dict[str, float]:
    readme = validate_batch(orjson.loads(readme_body()), max_activities=10)
    runs = runs_of(readme)
    out = {
        "encode_readme_v1_us": _per_call_us(lambda: encode_v1(readme, "bid")),
        "encode_readme_v2_us": _per_call_us(lambda: encode_runs(runs, "bid")),
        "runs_of_readme_us": _per_call_us(lambda: runs_of(readme)),
    }
    for name, body in (
        ("readme500", readme_batch(500)),
        ("mixed500", orjson.dumps(next(mixed_bodies(500, 500, seed=3)))),
    ):
        acts = validate_batch(orjson.loads(body), max_activities=1000)
        table = acts[0].table
        acts = [a for a in acts if a.table == table]
        v1 = _received(encode_v1(acts, "bid")[0].data)
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
