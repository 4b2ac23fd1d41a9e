"""Running a `Subscriber` loop on a thread in tests, and waiting for what it does."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Callable, Iterator, NamedTuple

from app.broker.base import Broker
from app.broker.local import LocalBroker
from app.messages.codec import encode_batch
from app.messages.deadletters import DeadLetterStore
from app.pipeline.admin import AdminServer
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse import open_warehouse
from app.warehouse.base import Warehouse
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


class LocalPipeline(NamedTuple):
    broker: LocalBroker
    warehouse: Warehouse
    store: DeadLetterStore
    subscriber: Subscriber


@contextlib.contextmanager
def local_pipeline(settings: Settings, warehouse: Warehouse | None = None) -> Iterator[LocalPipeline]:
    """A subscriber over a local broker file, a warehouse (the settings' unless given) and
    a dead-letter store, all closed on exit."""
    broker = LocalBroker(settings)
    wh = warehouse if warehouse is not None else open_warehouse(settings)
    store = DeadLetterStore(settings.dead_letter_file)
    try:
        yield LocalPipeline(broker, wh, store, Subscriber(settings, broker, wh, store))
    finally:
        broker.close()
        wh.close()
        store.close()


@contextlib.contextmanager
def admin_url(subscriber: Subscriber) -> Iterator[str]:
    """The subscriber's admin server on a free local port: its base URL."""
    port = processes.free_port()
    admin = AdminServer(subscriber, "127.0.0.1", port)
    admin.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        admin.stop()


def publish_one(broker: Broker, table: str, batch_id: str, value: Any = 1) -> None:
    """One insert of `value` into `table`'s integer column `n`, as its own batch."""
    messages = encode_batch([Activity("insert", table, ["n"], ["integer"], [value])], batch_id)
    asyncio.run(broker.publish(messages, batch_id=batch_id))
