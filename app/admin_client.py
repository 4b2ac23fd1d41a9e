"""Reading the warehouse from a tool (`query`, `dead-letters replay`) while a subscriber may run.

The DuckDB file admits one process, the subscriber; while it runs, tools go through its
admin port (`app.pipeline.admin`). Without a subscriber they read the warehouse
themselves. Between the two, a subscriber that is starting holds the file before its
port answers: then `through_subscriber` waits for either, for a bounded time.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any, Callable, TypeVar

import orjson

from app.settings import Settings

T = TypeVar("T")
POLL_SECONDS = 0.25


class NoSubscriber(Exception):
    """Nothing answers on the subscriber's admin port."""


class AdminError(Exception):
    """The admin port answered with an error (bad SQL, warehouse down): `message` says why."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class SubscriberNotReady(Exception):
    """The warehouse file stayed locked and no admin port answered within the wait."""


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def url_host(host: str) -> str:
    """`host` as a URL spells it: an IPv6 literal in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def admin_url(settings: Settings, path: str = "") -> str:
    """The subscriber's admin port as a client reaches it: a wildcard bind via loopback."""
    host = settings.subscriber_host
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"http://{url_host(host)}:{settings.subscriber_port}{path}"


def admin_request(settings: Settings, path: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    """GET (or POST `body` as JSON to) the admin port; the decoded JSON answer."""
    request = urllib.request.Request(
        admin_url(settings, path),
        data=None if body is None else orjson.dumps(body),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read()).get("message", str(exc))
        except (orjson.JSONDecodeError, AttributeError):
            message = str(exc)
        raise AdminError(exc.code, message) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NoSubscriber(str(exc)) from None


def through_subscriber(
    via_admin: Callable[[], T],
    directly: Callable[[], T],
    wait_seconds: float,
    on_wait: Callable[[], None] | None = None,
) -> T:
    """`via_admin()` if a subscriber answers, else `directly()`; if the file is locked, wait.

    `directly` raises `WarehouseLocked` while a subscriber holds the file; this then
    polls both for up to `wait_seconds` (calling `on_wait` once) and raises
    `SubscriberNotReady` if neither succeeds.
    """
    from app.warehouse.base import WarehouseLocked

    try:
        return via_admin()
    except NoSubscriber:
        pass
    try:
        return directly()
    except WarehouseLocked as exc:
        locked: Exception = exc
    if on_wait is not None:
        on_wait()
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        try:
            return via_admin()
        except NoSubscriber:
            pass
        try:
            return directly()  # the subscriber may have stopped meanwhile
        except WarehouseLocked as exc:
            locked = exc
    raise SubscriberNotReady(f"{locked} (no admin port answered within {wait_seconds:.0f}s)")
