"""Benchmark baseline: the framework ceiling. Reads the body, answers 200, nothing else.

Started by `python -m scripts.bench` (scripts/bench/run.py) with the same uvicorn settings as the real API
(uvloop, httptools, no access log).
"""

from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()
_OK = b'{"error":false,"message":"accepted"}'


@app.post("/api-log/v1/")
async def ingest(request: Request) -> Response:
    await request.body()
    return Response(_OK, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
