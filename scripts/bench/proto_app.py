"""Benchmark baseline: the prototype's own pattern.

A `List[dict]` Pydantic model (shape only: no value is validated) and a fire-and-forget
publish to Pub/Sub on pstest: the publisher client's future is never awaited, so the 200
says nothing about durability. Started by `python -m scripts.bench` (scripts/bench/run.py)
with the real API's uvicorn settings and `PUBSUB_EMULATOR_HOST` pointing at a pstest it started.
"""

import os
import uuid
from contextlib import asynccontextmanager
from typing import List

import orjson
from fastapi import FastAPI
from google.cloud import pubsub_v1
from pydantic import BaseModel
from starlette.responses import Response

PROJECT = os.environ.get("GCP_PROJECT", "bench-project")
TOPIC = os.environ.get("PUBSUB_TOPIC", "user-activities")


@asynccontextmanager
async def lifespan(app: FastAPI):
    publisher = pubsub_v1.PublisherClient()  # PUBSUB_EMULATOR_HOST: insecure channel to pstest
    app.state.topic = publisher.topic_path(PROJECT, TOPIC)
    try:
        publisher.create_topic(name=app.state.topic)
    except Exception:  # noqa: BLE001 - already there from an earlier round
        pass
    app.state.publisher = publisher
    yield
    publisher.stop()


app = FastAPI(lifespan=lifespan)


class Body(BaseModel):
    user_activities: List[dict]


@app.post("/api-log/v1/")
async def ingest(body: Body) -> Response:
    batch_id = uuid.uuid4().hex
    app.state.publisher.publish(app.state.topic, orjson.dumps(body.user_activities))  # future never awaited
    return Response(orjson.dumps({"error": False, "message": "accepted", "batch_id": batch_id}), media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
