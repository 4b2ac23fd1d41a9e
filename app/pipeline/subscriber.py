"""The subscriber loop: pull, decode, apply per table, dead-letter what can't apply, ack.

A message is acked only after the warehouse committed it (or after what can never apply
was recorded in the dead-letter store). Errors are kept apart the way a retry loop
needs: transient warehouse errors are retried in place with capped exponential backoff
and never dead-letter anything; any other failure is narrowed down to the culprit
envelope, which is dead-lettered after `max_delivery_attempts`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import orjson

from app import metrics
from app.broker.base import Broker, BrokerUnavailable, ReceivedMessage
from app.logs import bound
from app.pipeline.codec import UndecodableMessage, decode_message
from app.pipeline.deadletter import DeadLetterStore, NewDeadLetter
from app.settings import Settings
from app.warehouse.base import ApplyResult, Envelope, TransientWarehouseError, Warehouse

log = logging.getLogger("app.subscriber")

PULL_TIMEOUT_SECONDS = 0.5
RETRY_BACKOFF_START_SECONDS = 0.2
POISON_RETRY_DELAY_SECONDS = 1.0


@dataclass
class Totals:
    """Running totals of this process, for logs, the admin port and tests."""

    messages_acked: int = 0
    rows_inserted: int = 0
    rows_deleted: int = 0
    duplicates_skipped: int = 0
    dead_lettered: int = 0
    last_write_by_table: dict[str, float] = field(default_factory=dict)


class Subscriber:
    def __init__(self, settings: Settings, broker: Broker, warehouse: Warehouse, dead_letters: DeadLetterStore) -> None:
        self.settings = settings
        self.broker = broker
        self.warehouse = warehouse
        self.dead_letters = dead_letters
        self.stop_event = threading.Event()
        self.totals = Totals()
        self.last_transient_error: str | None = None  # for /readyz while a retry holds the warehouse
        # The warehouse connection is not shared across threads; the admin port's
        # queries take this lock too.
        self.warehouse_lock = threading.RLock()

    # --- loop ---
    def run(self) -> None:
        self.broker.start_subscriber()
        log.info("subscriber started", extra={"broker": self.broker.name, "warehouse": self.warehouse.capabilities.name})
        while not self.stop_event.is_set():
            try:
                messages = self.broker.pull(self.settings.pull_max_messages, PULL_TIMEOUT_SECONDS)
            except BrokerUnavailable as exc:
                log.warning("broker unavailable, retrying: %s", exc)
                self.stop_event.wait(1.0)
                continue
            if messages:
                try:
                    self.process(messages)
                except BrokerUnavailable as exc:
                    # An ack/nack could not reach the broker (file locked, emulator gone):
                    # the messages come back after their lease and the warehouse's dedup_id
                    # drops what was already applied. Keep running instead of dying.
                    log.warning("broker unavailable while settling messages (they will be redelivered): %s", exc)
                    self.stop_event.wait(1.0)
        log.info("subscriber stopped")

    def stop(self) -> None:
        self.stop_event.set()

    # --- one pull ---
    def process(self, messages: Sequence[ReceivedMessage]) -> None:
        by_table: dict[str, list[tuple[ReceivedMessage, Envelope]]] = {}
        poison: list[NewDeadLetter] = []
        poison_messages: list[ReceivedMessage] = []
        for message in messages:
            try:
                envelope = decode_message(message)
            except UndecodableMessage as exc:
                poison.append(
                    NewDeadLetter(
                        reason=str(exc), kind="message", payload=bytes(message.data), attempts=message.delivery_attempt,
                        table_name=message.attributes.get("table"), dedup_id=message.dedup_id, message_id=message.message_id,
                    )
                )
                poison_messages.append(message)
                continue
            by_table.setdefault(envelope.table, []).append((message, envelope))
        if poison:
            self._dead_letter(poison, "undecodable")
            self._forward(list(zip(poison_messages, (p.reason for p in poison))))
            self._ack(poison_messages)
        for table, items in by_table.items():
            if self.stop_event.is_set():
                self.broker.nack([m for m, _ in items])
                continue
            with bound(batch_id=_batch_ids(items)):  # on every line logged while applying
                self._apply_table(table, items)

    def _apply_table(self, table: str, items: list[tuple[ReceivedMessage, Envelope]]) -> None:
        messages = [m for m, _ in items]
        envelopes = [e for _, e in items]
        try:
            result = self._apply_with_retry(table, envelopes)
        except _Stopping:
            self.broker.nack(messages)
            return
        except Exception as exc:  # terminal: narrow it down to the culprit envelope(s)
            if len(items) > 1:
                log.warning("apply of %d messages to %s failed (%s); applying one by one", len(items), table, exc)
                for item in items:
                    self._apply_table(table, [item])
                return
            message, envelope = items[0]
            if message.delivery_attempt >= self.settings.max_delivery_attempts:
                self._dead_letter(
                    [
                        NewDeadLetter(
                            reason=f"failed {message.delivery_attempt} times: {exc}", kind="message",
                            payload=bytes(message.data), attempts=message.delivery_attempt, table_name=table,
                            dedup_id=envelope.dedup_id, message_id=message.message_id,
                        )
                    ],
                    "max_attempts",
                )
                self._forward([(message, f"failed {message.delivery_attempt} times: {exc}")])
                self._ack([message])
            else:
                log.warning("message %s to %s failed (attempt %d): %s", message.message_id, table, message.delivery_attempt, exc)
                self.broker.nack([message], POISON_RETRY_DELAY_SECONDS)
            return
        self._record(table, result)
        log.info(
            "applied",
            extra={"table": table, "messages": len(messages), "rows_inserted": result.rows_inserted,
                   "rows_deleted": result.rows_deleted, "duplicates_skipped": result.skipped_duplicates,
                   "rejected": len(result.rejections), "schema_changes": result.schema_changes},
        )
        if result.rejections:
            message_of = {e.dedup_id: m for m, e in items}
            self._dead_letter(
                [
                    NewDeadLetter(
                        reason=r.reason, kind="activity", payload=orjson.dumps(r.activity.to_dict()),
                        attempts=message_of[r.dedup_id].delivery_attempt if r.dedup_id in message_of else 1,
                        table_name=table, dedup_id=r.dedup_id, activity_index=r.index,
                        message_id=message_of[r.dedup_id].message_id if r.dedup_id in message_of else None,
                    )
                    for r in result.rejections
                ],
                "rejected",
            )
        self._ack(messages)

    def _apply_with_retry(self, table: str, envelopes: list[Envelope]) -> ApplyResult:
        delay = RETRY_BACKOFF_START_SECONDS
        while True:
            try:
                started = time.perf_counter()
                with self.warehouse_lock:
                    result = self.warehouse.apply(table, envelopes)
                metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
                self.last_transient_error = None
                return result
            except TransientWarehouseError as exc:
                self.last_transient_error = str(exc)
                metrics.TRANSIENT_ERRORS.inc()
                log.warning("warehouse unavailable, retrying %s in %.1fs: %s", table, delay, exc)
                if self.stop_event.wait(delay):
                    raise _Stopping() from None
                delay = min(delay * 2, self.settings.retry_backoff_max_seconds)

    # --- bookkeeping ---
    def _record(self, table: str, result: ApplyResult) -> None:
        t = self.totals
        t.rows_inserted += result.rows_inserted
        t.rows_deleted += result.rows_deleted
        t.duplicates_skipped += result.skipped_duplicates
        if result.rows_inserted or result.rows_deleted:
            t.last_write_by_table[table] = time.time()
        if result.rows_inserted:
            metrics.ROWS_APPLIED.labels(table, "insert").inc(result.rows_inserted)
        if result.rows_deleted:
            metrics.ROWS_APPLIED.labels(table, "delete").inc(result.rows_deleted)
        metrics.DUPLICATES_SKIPPED.inc(result.skipped_duplicates)
        metrics.NOOP_DELETES.inc(result.noop_deletes)
        metrics.SCHEMA_CHANGES.inc(result.schema_changes)

    def _dead_letter(self, entries: list[NewDeadLetter], category: str) -> None:
        self.dead_letters.add(entries)
        self.totals.dead_lettered += len(entries)
        metrics.DEAD_LETTERED.labels(category).inc(len(entries))
        for e in entries:
            log.warning("dead-lettered %s of %s: %s", e.kind, e.table_name, e.reason)

    def _forward(self, entries: list[tuple[ReceivedMessage, str]]) -> None:
        """Best effort: the dead-letter store already holds these durably."""
        try:
            self.broker.forward_dead_letters(entries)
        except Exception as exc:
            log.warning("could not forward %d dead letter(s) to the broker's dead-letter topic: %s", len(entries), exc)

    def _ack(self, messages: list[ReceivedMessage]) -> None:
        self.broker.ack(messages)
        self.totals.messages_acked += len(messages)
        metrics.MESSAGES_ACKED.inc(len(messages))


def _batch_ids(items: list[tuple[ReceivedMessage, Envelope]]) -> str:
    """The batch id(s) of a table's messages in one pull, comma-separated in order."""
    ids = dict.fromkeys(m.attributes.get("batch_id") or e.dedup_id.rsplit(":", 2)[0] for m, e in items)
    return ",".join(ids)


class _Stopping(Exception):
    """Shutdown was asked for while retrying: release the messages instead."""
