"""Benchmark baseline: the prototype's pattern.

A `List[dict]` Pydantic model (shape only: no value is validated) and a fire-and-forget
publish into the same local broker (`asyncio.create_task`, the 200 does not wait for
durability). Started by scripts/bench.py with the real API's uvicorn settings.
"""

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import List

import orjson
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.responses import Response

from app.broker import make_broker
from app.broker.base import OutgoingMessage
from app.settings import get_settings

_tasks: set[asyncio.Task] = set()


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.broker = make_broker(get_settings())
    yield
    await asyncio.gather(*_tasks, return_exceptions=True)
    app.state.broker.close()


app = FastAPI(lifespan=lifespan)


class Body(BaseModel):
    user_activities: List[dict]


@app.post("/api-log/v1/")
async def ingest(body: Body) -> Response:
    batch_id = uuid.uuid4().hex
    by_table: dict[str, list[dict]] = {}
    for a in body.user_activities:
        by_table.setdefault(str(a.get("table")), []).append(a)
    messages = [
        OutgoingMessage(
            data=orjson.dumps({"v": 1, "batch_id": batch_id, "table": t, "activities": acts}),
            ordering_key=t,
            attributes={"table": t, "count": str(len(acts)), "batch_id": batch_id, "dedup_id": f"{batch_id}:{t}:0"},
        )
        for t, acts in by_table.items()
    ]
    task = asyncio.create_task(app.state.broker.publish(messages, batch_id=batch_id))  # not awaited
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return Response(orjson.dumps({"error": False, "message": "accepted", "batch_id": batch_id}), media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
