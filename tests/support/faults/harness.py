"""What the scenarios send and how: bodies, posts retried like a client, the processes."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.support.processes import Pipeline

TRANSPORT_ERRORS = (httpx.TransportError,)


def activity(op: str, table: str, names: list[str], types: list[str], values: list[Any]) -> dict[str, Any]:
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def rows_body(table: str, first_id: int, n: int, marker: str) -> dict[str, Any]:
    """n inserts with ids first_id.. and a `marker` column naming their batch."""
    return {
        "user_activities": [
            activity("insert", table, ["id", "marker"], ["integer", "string"], [i, marker])
            for i in range(first_id, first_id + n)
        ]
    }


def status_of(call: Callable[[], httpx.Response]) -> tuple[str, httpx.Response | None]:
    try:
        r = call()
    except TRANSPORT_ERRORS as exc:
        return type(exc).__name__, None
    return str(r.status_code), r


def post_until_accepted(post: Callable[[], httpx.Response], timeout: float = 120) -> tuple[httpx.Response, float, Counter]:
    """Retry like a client honouring Retry-After until a 200; (response, seconds, statuses seen)."""
    started = time.monotonic()
    seen: Counter = Counter()
    while True:
        status, r = status_of(post)
        seen[status] += 1
        if r is not None and r.status_code == 200:
            return r, time.monotonic() - started, seen
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no 200 within {timeout}s; saw {dict(seen)}")
        wait = 0.2
        if r is not None and r.headers.get("retry-after"):
            wait = min(float(r.headers["retry-after"]), 1.0)
        time.sleep(wait)


def start_pipeline(tmp: Path, **env: str) -> Pipeline:
    return Pipeline.create(Path(tmp), **env)


def kill_subscriber_while(p: Pipeline, producer: threading.Thread, rng: random.Random, *, at_least: int,
                          pause: tuple[float, float]) -> int:
    """kill -9 and restart the subscriber at random moments until the producer is done
    (and at least `at_least` times); returns the number of kills."""
    kills = 0
    while producer.is_alive() or kills < at_least:
        threading.Event().wait(rng.uniform(*pause))
        p.kill("subscriber", signal.SIGKILL)
        kills += 1
        p.start("subscriber")
    producer.join()
    return kills


@dataclass
class UpsertStorm:
    """Requests of upserts (some as inserts on a keyed table, now and then a delete) of
    `keys` keys per table, each carrying a rising `version` and `note` 'v<version>'.
    `expected` is what the accepted requests leave: (table, key) -> version (absent: deleted)."""

    tables: list[str]
    keys: int
    per_request: int
    seed: int
    expected: dict[tuple[str, int], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def produce(self, post: Callable[[dict[str, Any]], httpx.Response], requests: int) -> None:
        rng, version, keyed = random.Random(self.seed), 0, set()
        for _ in range(requests):
            acts, after, keyed_after = [], dict(self.expected), set(keyed)
            for _ in range(self.per_request):
                version += 1
                table, k, roll = rng.choice(self.tables), rng.randrange(self.keys), rng.random()
                if roll < 0.05:
                    acts.append(activity("delete", table, ["k"], ["integer"], [k]))
                    after.pop((table, k), None)
                    continue
                op = "insert" if roll >= 0.8 and table in keyed_after else "upsert"
                act = activity(op, table, ["k", "version", "note"], ["integer", "integer", "string"],
                               [k, version, f"v{version}"])
                if op == "upsert":
                    act["key"] = ["k"]
                keyed_after.add(table)
                acts.append(act)
                after[(table, k)] = version
            resp = post({"user_activities": acts})
            if resp.status_code != 200:
                self.errors.append(resp.text)
                continue
            self.expected, keyed = after, keyed_after

    def wanted(self, table: str) -> list[tuple[int, int]]:
        """(key, version) of `table`'s rows, by key."""
        return sorted((k, v) for (t, k), v in self.expected.items() if t == table)
