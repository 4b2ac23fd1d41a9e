"""The subscriber loop: pull, decode, apply per table on worker threads, dead-letter what
can't apply, ack.

A message is acked only after the warehouse committed it (or after what can never apply
was recorded in the dead-letter store). One thread pulls while `SUBSCRIBER_WORKERS`
threads apply; each table's messages apply in pull order, one batch at a time, and a
table that waits for a retry holds no worker (see `scheduling`). Flow control bounds
what is held.

Errors are kept apart the way a retry loop needs:
- a transient warehouse error is retried in place with capped exponential backoff (or
  after the warehouse's `retry_after`) while the table's messages have been held less
  than `MAX_IN_PLACE_RETRY_SECONDS` (and half the broker's lease); then they are nacked
  with a delay so a later delivery, maybe on another replica, takes them. Transient
  errors never count towards dead-lettering.
- any other failure is narrowed down to the culprit envelope, whose terminal failures
  this process counts per `dedup_id`; it is dead-lettered after `MAX_DELIVERY_ATTEMPTS`.
  Until then it is nacked with the table's later messages, so the table's order holds.
- a `WarehouseUnavailable` (a permission, credential or feature the whole warehouse
  refuses) blocks the subscriber: not ready (/readyz says why), no pulling, and its
  held messages are retried (or, once pulled again, probed) only every
  `RETRY_BACKOFF_MAX_SECONDS`, until an apply succeeds. Like any transient error it
  never counts towards dead-lettering.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import orjson

from app import metrics
from app.broker.base import Broker, BrokerUnavailable, ReceivedMessage
from app.contracts.reload import tables_file_of
from app.pipeline.type_conflicts import to_quarantine
from app.schema.identifiers import QUARANTINE_TABLE
from app.logs import bound
from app.messages.codec import UndecodableMessage, decode_message, readable_body
from app.messages.deadletters import DeadLetterStore, NewDeadLetter, rejected_activity_message
from app.pipeline.freshness import Freshness
from app.pipeline.receipts import ReceiptRecorder
from app.receipts.base import Outcome, ReceiptStore
from app.tracing import ATTRIBUTE as TRACEPARENT
from app.tracing import apply_spans, trace_ids
from app.pipeline.scheduling import Held, Scheduler, TableQueue, TerminalFailures
from app.settings import Settings
from app.warehouse.base import (
    ApplyResult, Envelope, Rejection, TransientWarehouseError, Warehouse, WarehouseUnavailable,
)

log = logging.getLogger("app.subscriber")

PULL_TIMEOUT_SECONDS = 0.5
RETRY_BACKOFF_START_SECONDS = 0.2
POISON_RETRY_DELAY_SECONDS = 1.0
# One apply takes at most this many bytes of messages (and PULL_MAX_MESSAGES messages).
APPLY_MAX_BYTES = 32 * 1024 * 1024
# When flow control is full, tables waiting at least this long for a retry hand their
# messages back (a shorter wait is cheaper than a redelivery).
MIN_WAIT_RELEASED_SECONDS = 1.0
# dedup_ids whose terminal failures are remembered.
TRACKED_FAILURES = 10_000


@dataclass
class Totals:
    """Running totals of this process, for logs, the admin port and tests."""

    messages_acked: int = 0
    rows_inserted: int = 0
    rows_upserted: int = 0
    rows_deleted: int = 0
    duplicates_skipped: int = 0
    dead_lettered: int = 0
    last_write_by_table: dict[str, float] = field(default_factory=dict)


class Subscriber:
    def __init__(
        self, settings: Settings, broker: Broker, warehouse: Warehouse, dead_letters: DeadLetterStore,
        receipts: ReceiptStore | None = None,
    ) -> None:
        self.settings = settings
        self.receipts = ReceiptRecorder(receipts)  # each settled message's outcome, before its ack
        self.freshness = Freshness(settings.lag_warn_seconds)
        self.broker = broker
        self.warehouse = warehouse
        self.dead_letters = dead_letters
        self.stop_event = threading.Event()
        self.totals = Totals()
        self._totals_lock = threading.Lock()
        # Serializes applies on a warehouse without `concurrent_tables` (DuckDB's one
        # connection); the admin port's queries take it too.
        self.warehouse_lock = threading.RLock()
        self.scheduler = Scheduler(
            max_messages=settings.subscriber_max_outstanding_messages,
            max_bytes=settings.subscriber_max_outstanding_bytes,
            max_messages_per_table=settings.subscriber_max_outstanding_messages_per_table,
            initial_backoff=min(RETRY_BACKOFF_START_SECONDS, settings.retry_backoff_max_seconds),
        )
        self.failures = TerminalFailures(TRACKED_FAILURES)
        # Refused activities whose forward to the broker's dead-letter destination failed,
        # by dedup_id, until their message comes back (bounded like `failures`).
        self._unforwarded: collections.OrderedDict[str, dict[int, tuple[ReceivedMessage, str]]] = (
            collections.OrderedDict()
        )
        self._transient_errors: dict[str, str] = {}  # table -> last transient error, until it applies
        self._blocked: WarehouseUnavailable | None = None  # until an apply succeeds
        self._blocked_until = 0.0  # monotonic: no pull before this while blocked
        # A held message must be settled before its lease ends; retries in place stay
        # within half of it.
        self.lease_seconds = broker.max_lease_seconds or settings.ack_deadline_seconds
        self.in_place_budget = min(settings.max_in_place_retry_seconds, self.lease_seconds / 2)
        # The tables file (docs/contracts.md), reloaded on change like the API's: the options
        # of the tables this process creates come from the version in force.
        self.tables_file = tables_file_of(settings)
        self._tables_file_lock = threading.Lock()  # worker threads share one reload
        if self.tables_file.path is not None:
            warehouse.table_options_source = self.table_options

    @property
    def last_transient_error(self) -> str | None:
        """For /readyz while a retry holds the warehouse: the newest error of a table still failing."""
        with self._totals_lock:
            errors = list(self._transient_errors.values())
        return errors[-1] if errors else None

    def tables_behind(self) -> dict[str, float]:
        """For /readyz: tables whose oldest held message waits longer than LAG_WARN_SECONDS since publish."""
        return self.freshness.behind(self.scheduler.oldest_published())

    @property
    def blocked(self) -> str | None:
        """Why the whole warehouse refuses this process (for /readyz), or None."""
        blocked = self._blocked
        return None if blocked is None else f"{blocked.reason}: {blocked}"

    def table_options(self, table: str) -> dict:
        """`table`'s options in the tables file in force (reloaded first if it changed)."""
        with self._tables_file_lock:
            config = self.tables_file.current()
        return {} if config is None else dict(config.settings_for(table).options)

    def tables_file_status(self) -> dict | None:
        """For /readyz: the file in force and a refused change, if any (None: no file)."""
        if self.tables_file.path is None:
            return None
        with self._tables_file_lock:
            return self.tables_file.status()

    # --- loop ---
    def run(self) -> None:
        self.broker.start_subscriber()
        workers = [
            threading.Thread(target=self._work, name=f"apply-{i}", daemon=True)
            for i in range(self.settings.subscriber_workers)
        ]
        for worker in workers:
            worker.start()
        log.info(
            "subscriber started",
            extra={"broker": self.broker.name, "warehouse": self.warehouse.name, "workers": len(workers)},
        )
        try:
            while not self.stop_event.is_set():
                blocked_for = self._blocked_until - time.monotonic() if self._blocked is not None else 0.0
                if blocked_for > 0:  # the next pull is the probe
                    self.stop_event.wait(min(blocked_for, PULL_TIMEOUT_SECONDS))
                    continue
                room = self.scheduler.wait_for_room(PULL_TIMEOUT_SECONDS)
                if room <= 0:
                    self._make_room()
                    continue
                pull = self.scheduler.begin_pull()
                try:
                    messages = self.broker.pull(min(self.settings.pull_max_messages, room), PULL_TIMEOUT_SECONDS)
                except BrokerUnavailable as exc:
                    log.warning("broker unavailable, retrying: %s", exc)
                    self.stop_event.wait(1.0)
                    continue
                if not messages:
                    if self.broker.intake_full():  # its window is full of keys we hold
                        self._make_room()
                    continue
                try:
                    self._dispatch(messages, pull)
                except BrokerUnavailable as exc:  # acking an undecodable message: it comes back
                    log.warning("broker unavailable while settling messages (they will be redelivered): %s", exc)
                    self.stop_event.wait(1.0)
        finally:
            self.scheduler.stop()
            for worker in workers:
                worker.join()  # each finishes the apply in hand
            self._nack(self.scheduler.drain(), 0.0, "shutdown")
            log.info("subscriber stopped")

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler: takes no lock); `run` then
        lets the workers finish their applies and hands back what is still held."""
        self.stop_event.set()

    def _make_room(self) -> None:
        """Flow control stayed full (ours, or the broker's intake): hand back what tables
        waiting for a retry hold, so the other tables' messages can be pulled meanwhile."""
        if self.stop_event.is_set():
            return
        for table, items, delay in self.scheduler.release_waiting(MIN_WAIT_RELEASED_SECONDS):
            log.info("flow control full: handing back %d message(s) of %s for %.1fs until its retry",
                     len(items), table, delay)
            self._nack(items, delay, "flow_control")

    def _dispatch(self, messages: Sequence[ReceivedMessage], pull: int) -> None:
        """Dead-letter what cannot be decoded; queue the rest per table."""
        now = time.monotonic()
        by_table: dict[str, list[Held]] = {}
        undecodable: list[tuple[ReceivedMessage, str]] = []
        for message in messages:
            try:
                envelope = decode_message(message)
            except UndecodableMessage as exc:
                undecodable.append((message, str(exc)))
                continue
            # The lease runs from the delivery (the broker's clock when it has one), not from now.
            received_at = now if message.received_at is None else message.received_at
            by_table.setdefault(envelope.table, []).append(Held(message, envelope, received_at))
        if undecodable:
            self._dead_letter(
                [
                    NewDeadLetter(
                        reason=reason, kind="message", payload=bytes(m.data), attempts=m.delivery_attempt,
                        table_name=m.attributes.get("table"), dedup_id=m.dedup_id, message_id=m.message_id,
                        key_id=m.attributes.get("key_id"),
                    )
                    for m, reason in undecodable
                ],
                "undecodable",
            )
            self._forward(undecodable)
            self.receipts.dead_lettered(undecodable)
            self._ack([m for m, _ in undecodable])
        for table, items in by_table.items():
            handed_back, delay, why = self.scheduler.hold(table, items, pull)
            if handed_back:
                self._nack(handed_back, delay, why)

    # --- workers ---
    def _work(self) -> None:
        max_tables = self.warehouse.capabilities.max_tables_per_apply
        while queues := self.scheduler.next_tables(max_tables):
            retry_at: dict[str, float | None] = {}
            try:
                retry_at = self._apply_next(queues)
            except Exception:
                log.exception("unexpected error while applying to %s; handing their messages back",
                              ", ".join(q.name for q in queues))
                for queue in queues:
                    self._release(queue, POISON_RETRY_DELAY_SECONDS, "error")
            finally:
                for queue in queues:
                    self.scheduler.finish(queue, retry_at.get(queue.name))

    def _apply_next(self, queues: list[TableQueue]) -> dict[str, float | None]:
        """Apply the oldest messages of each table together; return when tables that
        should wait may try again."""
        batches = self._take_batches(queues)
        if not batches:
            return {}
        held = [h for _, batch in batches for h in batch]
        with (
            bound(batch_id=_batch_ids(held), trace_id=trace_ids([h.message.attributes.get(TRACEPARENT) for h in held])),
            apply_spans([(q.name, [h.message.attributes.get(TRACEPARENT) for h in batch]) for q, batch in batches]),
        ):  # ids on every line logged while applying; one `apply` span per table, ended after the ack
            outcomes = self._apply([(queue.name, [h.envelope for h in batch]) for queue, batch in batches])
            retry_at: dict[str, float | None] = {}
            applied: list[tuple[TableQueue, list[Held]]] = []
            receipts: list[Outcome] = []
            for (queue, batch), outcome in zip(batches, outcomes):
                if isinstance(outcome, WarehouseUnavailable):
                    self._block(outcome)
                    retry_at[queue.name] = self._on_transient(queue, outcome, self.settings.retry_backoff_max_seconds)
                elif isinstance(outcome, TransientWarehouseError):
                    retry_at[queue.name] = self._on_transient(queue, outcome)
                elif isinstance(outcome, BaseException):
                    self._on_terminal(queue, batch, outcome)
                elif self._on_applied(queue, batch, outcome, receipts):
                    applied.append((queue, batch))
            self.receipts.record(receipts)  # before the ack, one write for the apply's tables
            self._settle(applied)
        return retry_at

    def _take_batches(self, queues: list[TableQueue]) -> list[tuple[TableQueue, list[Held]]]:
        """Each table's oldest messages, all tables within one apply's byte budget (a table
        left out goes again at once)."""
        batches: list[tuple[TableQueue, list[Held]]] = []
        budget = APPLY_MAX_BYTES
        for queue in queues:
            held_since = self.scheduler.held_since(queue)
            if held_since is None:
                continue
            if time.monotonic() - held_since > self.lease_seconds:
                # The broker has given them out again by now; applying them here could
                # overtake the redelivered copies, so hand everything back in order.
                log.warning("held messages of %s outlived their lease; handing them back", queue.name)
                self._release(queue, 0.0, "lease_expired")
                continue
            if any(h.message.lease_lost for h in list(queue.items)):  # list(): one atomic copy
                # The broker says another delivery may be elsewhere: never apply ours.
                log.warning("the broker lost the lease of held messages of %s; handing them back", queue.name)
                self._release(queue, 0.0, "lease_lost")
                continue
            if budget <= 0:
                continue
            batch = self.scheduler.batch(queue, 1 if queue.isolate else self.settings.pull_max_messages, budget)
            budget -= sum(h.size for h in batch)
            batches.append((queue, batch))
        return batches

    def _apply(self, batches: list[tuple[str, list[Envelope]]]) -> list[ApplyResult | Exception]:
        serialize = not self.warehouse.capabilities.concurrent_tables
        with self.warehouse_lock if serialize else nullcontext():
            started = time.perf_counter()
            outcomes = self.warehouse.apply_many(batches)
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        metrics.MESSAGES_PER_APPLY.observe(sum(len(envelopes) for _, envelopes in batches))
        metrics.TABLES_PER_APPLY.observe(len(batches))
        return outcomes

    def _block(self, exc: WarehouseUnavailable) -> None:
        with self._totals_lock:
            newly = self._blocked is None
            self._blocked = exc
            self._blocked_until = time.monotonic() + self.settings.retry_backoff_max_seconds
        if newly:
            metrics.SUBSCRIBER_BLOCKED.labels(exc.reason).set(1)
            log.error("warehouse refuses this subscriber (%s); pulling stops, retrying every %.0fs: %s",
                      exc.reason, self.settings.retry_backoff_max_seconds, exc)

    def _unblock(self) -> None:
        with self._totals_lock:
            blocked, self._blocked = self._blocked, None
        if blocked is not None:
            metrics.SUBSCRIBER_BLOCKED.labels(blocked.reason).set(0)
            log.info("warehouse accepts this subscriber again (was %s); pulling resumes", blocked.reason)

    def _on_applied(self, queue: TableQueue, batch: list[Held], result: ApplyResult, receipts: list[Outcome]) -> bool:
        """Record an apply (its receipt outcomes added to `receipts`, for the caller to
        record before the ack); whether its messages may be acked (their refused
        activities reached the broker's dead-letter destination)."""
        table = queue.name
        self._unblock()
        with self._totals_lock:
            self._transient_errors.pop(table, None)
        queue.last_error = None
        queue.backoff = queue.initial_backoff
        queue.isolate = max(0, queue.isolate - len(batch))
        self._record(table, result)
        self.freshness.applied(table, [h.message.published_at for h in batch])
        log.info(
            "applied",
            extra={"table": table, "messages": len(batch), "rows_inserted": result.rows_inserted,
                   "rows_upserted": result.rows_upserted, "rows_deleted": result.rows_deleted, "duplicates_skipped": result.skipped_duplicates,
                   "rejected": len(result.rejections), "schema_changes": result.schema_changes},
        )
        if result.rejections and self.tables_file.path is not None:
            result.rejections = self._quarantine_type_conflicts(table, batch, result.rejections)
        if result.rejections:
            message_of = {h.envelope.dedup_id: h.message for h in batch}
            self._dead_letter(
                [
                    NewDeadLetter(
                        reason=r.reason, kind="activity", payload=orjson.dumps(r.activity.to_dict()),
                        attempts=message_of[r.dedup_id].delivery_attempt if r.dedup_id in message_of else 1,
                        table_name=table, dedup_id=r.dedup_id, activity_index=r.index,
                        message_id=message_of[r.dedup_id].message_id if r.dedup_id in message_of else None,
                        key_id=message_of[r.dedup_id].attributes.get("key_id") if r.dedup_id in message_of else None,
                    )
                    for r in result.rejections
                ],
                "rejected",
            )
        receipts.extend(self.receipts.applied_outcomes(table, batch, result.rejections))
        self.failures.forget([h.envelope.dedup_id for h in batch])
        return self._forward_rejections(queue, batch, result)

    def _quarantine_type_conflicts(self, table: str, batch: list[Held], rejections: list[Rejection]) -> list[Rejection]:
        """Type conflicts the table's contract quarantines go to `_ingest_quarantine`; the
        rejections left to dead-letter (all of them if the quarantine apply fails)."""
        with self._tables_file_lock:
            config = self.tables_file.current()
        batch_ids = {h.envelope.dedup_id: h.message.attributes.get("batch_id") or h.envelope.dedup_id for h in batch}
        key_ids = {h.envelope.dedup_id: h.message.attributes.get("key_id") for h in batch}
        envelopes, rest = to_quarantine(config, table, rejections, batch_ids, key_ids)
        if not envelopes:
            return rejections
        outcome = self._apply([(QUARANTINE_TABLE, envelopes)])[0]
        if isinstance(outcome, Exception) or outcome.rejections:
            log.warning("could not quarantine %d type conflict(s) of %s; dead-lettering them: %s",
                        len(envelopes), table, outcome if isinstance(outcome, Exception) else outcome.rejections[0].reason)
            return rejections
        metrics.ACTIVITIES_QUARANTINED_BY_SUBSCRIBER.labels(table, "types").inc(len(envelopes))
        log.info("quarantined %d type conflict(s) of %s (contract types = discard_row)", len(envelopes), table)
        return rest

    def _on_transient(self, queue: TableQueue, exc: TransientWarehouseError, min_wait: float = 0.0) -> float | None:
        """Wait in place while the messages' hold stays within budget, else nack them with a delay."""
        table = queue.name
        queue.last_error = str(exc)
        with self._totals_lock:
            self._transient_errors[table] = queue.last_error
        metrics.TRANSIENT_ERRORS.inc()
        wait = max(queue.backoff, min_wait)
        retry_after = getattr(exc, "retry_after", None)  # e.g. a new column not yet visible to writes
        if retry_after:
            wait = max(wait, float(retry_after))
        queue.backoff = min(queue.backoff * 2, self.settings.retry_backoff_max_seconds)
        now = time.monotonic()
        held_since = self.scheduler.held_since(queue) or now
        if now - held_since + wait <= self.in_place_budget:
            log.warning("warehouse unavailable, retrying %s in %.1fs: %s", table, wait, exc)
            return now + wait
        longest = self.broker.capabilities.max_ack_deadline_seconds  # the longest nack delay it can express
        delay = wait if longest is None else min(wait, longest)
        log.warning(
            "warehouse unavailable, retrying %s in %.1fs (its messages, held %.0fs, handed back to the broker): %s",
            table, delay, now - held_since, exc,
        )
        self._release(queue, delay, "transient")
        return None

    def _on_terminal(self, queue: TableQueue, batch: list[Held], exc: Exception) -> None:
        table = queue.name
        if len(batch) > 1:
            log.warning("apply of %d messages to %s failed (%s); applying one by one", len(batch), table, exc)
            queue.isolate = len(batch)
            return
        [held] = batch
        message, dedup_id = held.message, held.envelope.dedup_id
        failures = self.failures.record(dedup_id)
        if failures < self.settings.max_delivery_attempts:
            log.warning(
                "message %s to %s failed (%d of %d, delivery attempt %d): %s",
                message.message_id, table, failures, self.settings.max_delivery_attempts, message.delivery_attempt, exc,
            )
            queue.isolate = 0
            self._release(queue, POISON_RETRY_DELAY_SECONDS, "terminal")  # its followers too: order holds
            return
        reason = f"failed {failures} times: {exc}"
        self._dead_letter(
            [
                NewDeadLetter(  # a format 2 body is kept as its JSON rendering, readable and replayable
                    reason=reason, kind="message", payload=readable_body(message.data), attempts=failures,
                    table_name=table, dedup_id=dedup_id, message_id=message.message_id,
                    key_id=message.attributes.get("key_id"),
                )
            ],
            "max_attempts",
        )
        self._forward([(message, reason)])
        self.receipts.dead_lettered([(message, reason)], table)
        self.failures.forget([dedup_id])
        queue.isolate = max(0, queue.isolate - 1)
        self._settle([(queue, batch)])

    # --- settling with the broker ---
    def _settle(self, batches: list[tuple[TableQueue, list[Held]]]) -> None:
        """Ack the oldest messages of each queue (its batch), in one call, and stop holding them."""
        if not batches:
            return
        messages = [h.message for _, batch in batches for h in batch]
        # Forgotten before the ack: an ack frees the key at the broker, and the table's next
        # messages, pulled at once, must find its hold free, not be handed back as beyond it.
        for queue, batch in batches:
            self.scheduler.done(queue, len(batch))
        try:
            self._ack(messages)
        except BrokerUnavailable as exc:
            # They come back after their lease and the warehouse's dedup_id drops what
            # was already applied.
            log.warning("broker unavailable while acking %d message(s) (they will be redelivered): %s", len(messages), exc)

    def _release(self, queue: TableQueue, delay: float, why: str) -> None:
        self._nack(self.scheduler.release(queue, delay), delay, why)

    def _nack(self, items: list[Held], delay: float, why: str) -> None:
        if not items:
            return
        try:
            self.broker.nack([h.message for h in items], delay)
        except Exception as exc:  # not lost: an unsettled message comes back after its lease
            log.warning("could not nack %d message(s) (they come back after their lease): %s", len(items), exc)
            return
        metrics.MESSAGES_NACKED.labels(why).inc(len(items))

    def _ack(self, messages: list[ReceivedMessage]) -> None:
        self.broker.ack(messages)
        with self._totals_lock:
            self.totals.messages_acked += len(messages)
        metrics.MESSAGES_ACKED.inc(len(messages))

    # --- bookkeeping ---
    def _record(self, table: str, result: ApplyResult) -> None:
        with self._totals_lock:
            t = self.totals
            t.rows_inserted += result.rows_inserted
            t.rows_upserted += result.rows_upserted
            t.rows_deleted += result.rows_deleted
            t.duplicates_skipped += result.skipped_duplicates
            if result.rows_inserted or result.rows_upserted or result.rows_deleted:
                t.last_write_by_table[table] = time.time()
        if result.rows_inserted:
            metrics.ROWS_APPLIED.labels(table, "insert").inc(result.rows_inserted)
        if result.rows_upserted:
            metrics.ROWS_APPLIED.labels(table, "upsert").inc(result.rows_upserted)
        if result.rows_deleted:
            metrics.ROWS_APPLIED.labels(table, "delete").inc(result.rows_deleted)
        metrics.DUPLICATES_SKIPPED.inc(result.skipped_duplicates)
        metrics.NOOP_DELETES.inc(result.noop_deletes)
        metrics.SCHEMA_CHANGES.inc(result.schema_changes)
        if result.columns_widened:
            metrics.COLUMNS_WIDENED.labels(table).inc(result.columns_widened)

    def _dead_letter(self, entries: list[NewDeadLetter], category: str) -> None:
        self.dead_letters.add(entries)
        with self._totals_lock:
            self.totals.dead_lettered += len(entries)
        metrics.DEAD_LETTERED.labels(category).inc(len(entries))
        for e in entries:
            log.warning("dead-lettered %s of %s: %s", e.kind, e.table_name, e.reason)

    def _forward_rejections(self, queue: TableQueue, batch: list[Held], result: ApplyResult) -> bool:
        """Hand each refused activity of `batch` to the broker's dead-letter destination
        before its message is acked (on Pub/Sub the store is one replica's disk). If that
        fails, the messages go back: applied again they are duplicates, so this process
        keeps what is left to forward until they come back."""
        if not self.broker.capabilities.has_dead_letter_destination:
            return True  # the store is the only destination
        message_of = {h.envelope.dedup_id: h.message for h in batch}
        limits = self.broker.capabilities.message
        with self._totals_lock:
            for r in result.rejections:
                source = message_of.get(r.dedup_id)
                out = rejected_activity_message(queue.name, r.dedup_id, r.index, r.activity, limits)
                self._unforwarded.setdefault(r.dedup_id, {})[r.index] = (
                    ReceivedMessage(source.message_id if source else "", out.data, out.attributes, out.ordering_key,
                                    source.delivery_attempt if source else 1),
                    r.reason,
                )
            due = {d: self._unforwarded.pop(d) for d in message_of if d in self._unforwarded}
        entries = [entry for by_index in due.values() for entry in by_index.values()]
        if not entries:
            return True
        try:
            self.broker.forward_dead_letters(entries)
        except Exception as exc:
            log.warning("could not forward %d refused activit(ies) of %s to the dead-letter destination; "
                        "their messages go back: %s", len(entries), queue.name, exc)
            with self._totals_lock:
                self._unforwarded.update(due)
                while len(self._unforwarded) > TRACKED_FAILURES:
                    self._unforwarded.popitem(last=False)
            self._release(queue, POISON_RETRY_DELAY_SECONDS, "dead_letter_forward")
            return False
        return True

    def _forward(self, entries: list[tuple[ReceivedMessage, str]]) -> None:
        """Best effort: the dead-letter store already holds these durably."""
        try:
            self.broker.forward_dead_letters(entries)
        except Exception as exc:
            log.warning("could not forward %d dead letter(s) to the broker's dead-letter topic: %s", len(entries), exc)


def _batch_ids(batch: list[Held]) -> str:
    """The batch id(s) of the messages applied together, comma-separated in order."""
    ids = dict.fromkeys(h.message.attributes.get("batch_id") or h.envelope.dedup_id.rsplit(":", 2)[0] for h in batch)
    return ",".join(ids)
