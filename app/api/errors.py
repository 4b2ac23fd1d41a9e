"""Every error the API returns has one shape: {"error": true, "message": ..., "details": [...]}."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []
        self.headers = headers or {}
        self.key_id: str | None = None  # set by the ingest handler when the request presented a valid key


def error_response(status: int, message: str, details: list[Any] | None = None, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": True, "message": message, "details": details or []})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "details"],
    "properties": {
        "error": {"type": "boolean", "const": True},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"loc": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
