"""`LocalBroker`: the `Broker` interface over a group-commit writer and a lease store."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Sequence

from app.broker.base import (
    BacklogStats,
    Broker,
    BrokerCapabilities,
    OutgoingMessage,
    PORTABLE_LIMITS,
    PublishResult,
    ReceivedMessage,
)
from app.broker.local.leases import LeaseStore
from app.broker.local.writer import GroupCommitWriter
from app.settings import Settings

log = logging.getLogger(__name__)

READY_WRITE_WAIT_SECONDS = 1.0

CAPABILITIES = BrokerCapabilities(
    # SQLite would take a row of up to 1 GB and attributes of any size (a JSON column);
    # the portable limits let a message, a dead letter or a replay move between brokers
    # unchanged and keep a leased run within the subscriber's byte budget.
    message=PORTABLE_LIMITS,
    ordered_keys=True,
    remembers_idempotency_keys=True,  # the writer's idempotency table: duplicate, or 409 on another body
    min_ack_deadline_seconds=0.0,
    max_ack_deadline_seconds=None,
    max_lease_seconds=None,  # no lease keeper: a lease ends after ACK_DEADLINE_SECONDS
    has_dead_letter_destination=False,  # the dead-letter store is the only one
    reports_backlog=True,
)


class LocalBroker(Broker):
    """Durable SQLite-file broker; see the package docstring."""

    capabilities = CAPABILITIES

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path: Path = Path(settings.broker_file)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # reported by ready() / publish until it is fixed
            log.warning("cannot create %s: %s", self.path.parent, exc)
        self.leases = LeaseStore(self.path, ack_deadline=float(settings.ack_deadline_seconds))
        # Create the file and schema now if possible; if the file is unusable right now the
        # broker still starts (publish answers BrokerUnavailable, ready() says why).
        try:
            self.leases.open()
        except (sqlite3.Error, OSError) as exc:
            log.warning("local broker %s not usable yet: %s", self.path, exc)
        self.writer = GroupCommitWriter(self.path, publish_timeout=float(settings.publish_timeout_seconds))

    async def publish(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        batch_id: str,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> PublishResult:
        """Publish all messages in one fsynced transaction (shared with concurrent calls).

        Raises `BrokerUnavailable` when the queue is full, the commit fails, or the write lock
        could not be had within `publish_timeout_seconds`; in all these cases nothing of the
        call is stored (the writer claims a request only once it holds the write lock, and a
        claimed request's answer is its commit's outcome). Only if a claimed commit then hangs
        for another `publish_timeout_seconds` (a stuck disk) does the caller get
        `BrokerUnavailable` without that guarantee. `IdempotencyConflict` when the key was
        used with another fingerprint.
        """
        if not messages and idempotency_key is None:
            return PublishResult(batch_id=batch_id, message_count=0)
        return await self.writer.publish(
            messages, batch_id=batch_id, idempotency_key=idempotency_key, fingerprint=request_fingerprint
        )

    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        return self.leases.pull(max_messages, timeout)

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        self.leases.ack(messages)

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        self.leases.nack(messages, delay_seconds)

    def backlog(self) -> BacklogStats | None:
        return self.leases.backlog()

    def ready(self) -> tuple[bool, str]:
        try:
            if not self.path.exists():
                return False, f"local broker file {self.path} does not exist"
            conn = sqlite3.connect(str(self.path), timeout=READY_WRITE_WAIT_SECONDS, isolation_level=None)
            try:
                conn.execute("SELECT count(*) FROM messages WHERE id = 0").fetchone()
                # Readable is not enough: a publish needs the write lock. Our own writer
                # holds it only for a commit at a time, so a short wait gets it.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return False, f"local broker file {self.path}: {exc}"
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            return False, f"local broker file {self.path} is not writable"
        return True, "ok"

    def close(self) -> None:
        """Stop pulling, finish queued publishes, give this instance's outstanding leases back."""
        self.leases.close()
        self.writer.close()
