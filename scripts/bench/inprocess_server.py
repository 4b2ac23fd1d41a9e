"""Requests through uvicorn's own HTTP protocol (httptools, as `python -m app api` runs it), in memory.

`ServedConnection` feeds the raw bytes of an HTTP/1.1 request to one keep-alive
connection's `HttpToolsProtocol` and waits for its ASGI task: the server's parsing, its
ASGI cycle and the response it writes are counted with the app's work; only the
kernel's socket calls are left out. Used by `api_inprocess --server`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState


class MemoryTransport(asyncio.Transport):
    """The transport a protocol writes its responses to: keeps the status line of the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.status_line = b""
        self._closing = False

    def write(self, data: bytes) -> None:
        if data[:5] == b"HTTP/":
            self.status_line = data[: data.find(b"\r\n")]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8787), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class ServedConnection:
    """One client connection to `app` through the server's protocol, with the server's defaults."""

    def __init__(self, app: Any) -> None:
        # As `app.runtime.run_api` configures uvicorn (its lifespan is run by the caller).
        config = uvicorn.Config(app, http="httptools", log_config=None, access_log=False, lifespan="off")
        self.state = ServerState()
        self.transport = MemoryTransport()
        self.protocol = HttpToolsProtocol(config, self.state, {})
        self.protocol.connection_made(self.transport)

    async def request(self, raw: bytes) -> bytes:
        """Sends one request's bytes; returns the response's status line once the app has answered."""
        self.protocol.data_received(raw)
        while self.state.tasks:
            await asyncio.wait(set(self.state.tasks))
        return self.transport.status_line


def raw_request(path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 POST as a client sends it (headers as given, then the body)."""
    lines = [f"POST {path} HTTP/1.1".encode()] + [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
