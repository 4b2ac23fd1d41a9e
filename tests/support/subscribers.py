"""Running a `Subscriber` loop on a thread in tests, and waiting for what it does."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from app.pipeline.subscriber import Subscriber
from tests.support import processes

WAIT_SECONDS = 20.0


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll for a state the loop reaches on its own threads (fails after a generous limit)."""
    processes.wait_until(predicate, WAIT_SECONDS, 0.005, what)


@contextlib.contextmanager
def running(subscriber: Subscriber) -> Iterator[Subscriber]:
    """The subscriber's loop on a thread; stopped (and checked to stop) on exit."""
    thread = threading.Thread(target=subscriber.run, name="subscriber-loop", daemon=True)
    thread.start()
    try:
        yield subscriber
    finally:
        subscriber.stop()
        thread.join(WAIT_SECONDS)
        assert not thread.is_alive(), "the subscriber did not stop"
