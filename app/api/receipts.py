"""`GET /api-log/v1/batches/{batch_id}`: what became of a batch, per table.

Same key rules as ingest (401). A key from `API_KEYS_FILE` sees only the batches it
sent; any other batch answers 404 like an unknown one, so batch ids do not leak to
other clients. `API_KEYS` keys, which carry no client identity, see every batch.
A receipt past the retention answers 410: to every key when the store no longer knows
who sent it (a timed batch id past retention tells no more than its own time).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from app.api.auth import request_headers
from app.api.errors import ERROR_SCHEMA, ApiError
from app.api.ingest import RECEIPTS_PATH, json_response
from app.keys import ApiKey
from app.receipts import ANY_SENDER, BATCH_ID_PATTERN


def _visible(key: ApiKey | None, sender: object) -> bool:
    return key is None or key.from_env or sender is ANY_SENDER or key.id == sender


_TABLE_SCHEMA = {
    "type": "object",
    "properties": {
        "table": {"type": "string"},
        "state": {"type": "string", "enum": ["accepted", "applied", "dead_lettered", "quarantined"]},
        "activities": {"type": "integer"},
        "quarantined": {"type": "integer", "description": "Activities a table contract sent to _ingest_quarantine."},
        "rows_applied": {"type": "integer"},
        "rows_dead_lettered": {"type": "integer"},
        "settled_at": {"type": ["string", "null"]},
        "reason": {"type": ["string", "null"]},
    },
}
RECEIPT_SCHEMA = {
    "type": "object",
    "required": ["batch_id", "state", "accepted_at", "tables"],
    "properties": {
        "batch_id": {"type": "string"},
        "state": {"type": "string", "enum": ["accepted", "applied", "dead_lettered", "quarantined"]},
        "key_id": {"type": ["string", "null"]},
        "accepted_at": {"type": "string"},
        "tables": {"type": "array", "items": _TABLE_SCHEMA},
    },
}
RECEIPT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The batch's state per table.", "content": {"application/json": {"schema": RECEIPT_SCHEMA}}},
    **{
        code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for code, text in (
            (401, "Missing, wrong, expired or revoked API key."),
            (404, "No such batch, or one sent with another key."),
            (410, "The batch's receipt is past its retention."),
            (422, "The request is invalid."),
        )
    },
}


def install_receipts(app: FastAPI) -> None:
    not_found = ApiError(404, "no such batch (or not sent with this key)")

    @app.get(RECEIPTS_PATH + "{batch_id}", summary="What became of a batch, per table", responses=RECEIPT_RESPONSES)
    async def batch_receipt(batch_id: str, request: Request) -> Response:
        key = request.app.state.keys.authenticate(request_headers(request.scope))  # 401
        if not BATCH_ID_PATTERN.match(batch_id):
            raise not_found
        writer = request.app.state.receipts
        receipt = await asyncio.to_thread(writer.lookup, batch_id)
        if receipt is not None:
            if not _visible(key, receipt.key_id):
                raise not_found
            return json_response(200, receipt.as_json())
        purged, sender = await asyncio.to_thread(writer.store.gone, batch_id)
        if purged and _visible(key, sender):
            raise ApiError(410, "the batch's receipt is past its retention (RECEIPT_RETENTION_DAYS)")
        raise not_found
