"""Benchmark workloads: request bodies and the mixed-table backlog for the drain test."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from typing import Any, Iterator

import orjson

from app.messages.codec import encode_batch
from app.schema.validation import validate_batch

ROOT = Path(__file__).resolve().parents[2]
README_BODY = ROOT / "examples" / "readme.json"

# (table, share of inserts, [(column, type, value generator(i, rnd))])
TABLES: list[tuple[str, float, list[tuple[str, str, Any]]]] = [
    ("bench_events", 0.45, [
        ("user_id", "integer", lambda i, r: i),
        ("event_type_id", "integer", lambda i, r: r.randrange(50)),
        ("detail", "string", lambda i, r: r.choice(("logged in", "changed password", "viewed page", "logged out"))),
        ("occured_at", "datetime", lambda i, r: f"2021-03-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}"),
    ]),
    ("bench_orders", 0.35, [
        ("order_id", "integer", lambda i, r: i),
        ("amount", "numeric", lambda i, r: f"{r.randrange(100000)}.{r.randrange(100):02d}"),
        ("price", "float", lambda i, r: r.random() * 100),
        ("paid", "boolean", lambda i, r: r.random() < 0.8),
        ("created_at", "timestamp", lambda i, r: f"2024-05-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z"),
        ("note", "string", lambda i, r: None if i % 3 else "gift wrap"),
    ]),
    ("bench_sessions", 0.20, [
        ("session_id", "integer", lambda i, r: i),
        ("day", "date", lambda i, r: f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}"),
        ("duration_ms", "integer", lambda i, r: r.randrange(1, 3_600_000)),
        ("agent", "string", lambda i, r: r.choice(("Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0", "okhttp/4.12"))),
        ("ip", "string", lambda i, r: f"10.{i % 256}.{(i >> 8) % 256}.{(i >> 16) % 256}"),
    ]),
]
DELETE_SHARE = 0.01


def readme_body() -> bytes:
    return README_BODY.read_bytes()


def readme_batch(n: int) -> bytes:
    """`n` activities of the README's shape in one body."""
    template = orjson.loads(README_BODY.read_bytes())["user_activities"][0]
    acts = []
    for i in range(n):
        a = dict(template)
        a["col_values"] = [i, i % 7, "logged in", "2021-03-30 06:12:44"]
        acts.append(a)
    return orjson.dumps({"user_activities": acts})


def mixed_bodies(total: int, per_batch: int = 500, seed: int = 7) -> Iterator[dict]:
    """Request bodies of `per_batch` activities over the mixed tables, ~1% deletes of earlier rows."""
    rnd = random.Random(seed)
    weights = [share for _, share, _ in TABLES]
    next_id = [0] * len(TABLES)
    made = 0
    while made < total:
        acts = []
        for _ in range(min(per_batch, total - made)):
            t = rnd.choices(range(len(TABLES)), weights)[0]
            name, _, cols = TABLES[t]
            if next_id[t] > 10 and rnd.random() < DELETE_SHARE:
                victim = rnd.randrange(next_id[t])
                acts.append({"operation": "delete", "table": name, "col_names": [cols[0][0]],
                             "col_types": [cols[0][1]], "col_values": [victim]})
            else:
                i = next_id[t]
                next_id[t] += 1
                acts.append({"operation": "insert", "table": name, "col_names": [c for c, _, _ in cols],
                             "col_types": [ty for _, ty, _ in cols], "col_values": [g(i, rnd) for _, _, g in cols]})
        made += len(acts)
        yield {"user_activities": acts}


def publish_bodies(broker, bodies: Iterator[dict], on_activities=None) -> int:
    """Validate and encode each body as the API would, publish it through `broker.publish`
    (64 requests in flight); `on_activities(activities)` sees each validated batch.
    Returns how many messages were published."""
    messages = 0

    async def run() -> None:
        nonlocal messages
        pending = []
        for body in bodies:
            activities = validate_batch(body, max_activities=10_000)
            if on_activities is not None:
                on_activities(activities)
            batch_id = uuid.uuid4().hex
            msgs = encode_batch(activities, batch_id)
            messages += len(msgs)
            pending.append(broker.publish(msgs, batch_id=batch_id))
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending = []
        if pending:
            await asyncio.gather(*pending)

    asyncio.run(run())
    return messages


def prefill(broker, total: int, per_batch: int = 500) -> dict[str, Any]:
    """Publish `total` mixed activities through `broker.publish` (as the API would encode them).

    Returns counts and the column-major insert rows per table (for the raw baselines).
    """
    counts = {"inserts": 0, "deletes": 0}
    columns: dict[str, dict[str, list]] = {}

    def collect(activities) -> None:
        for a in activities:
            if a.operation == "insert":
                counts["inserts"] += 1
                cols = columns.setdefault(a.table, {n: [] for n in a.col_names})
                for n, v in zip(a.col_names, a.col_values):
                    cols[n].append(v)
            else:
                counts["deletes"] += 1

    messages = publish_bodies(broker, mixed_bodies(total, per_batch), collect)
    return {**counts, "messages": messages, "columns": columns}


def table_types() -> dict[str, list[tuple[str, str]]]:
    return {name: [(c, t) for c, t, _ in cols] for name, _, cols in TABLES}
