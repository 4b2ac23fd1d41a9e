"""The subscriber side of the local broker: leases (pull), ack, nack, backlog.

It has its own connection with ``synchronous=NORMAL``: losing a lease or an ack on power
loss only causes a redelivery, which at-least-once delivery allows and the warehouse's
`dedup_id` absorbs.

* A lease is taken inside ``BEGIN IMMEDIATE``, so several pullers (threads or processes)
  never get the same message while it is leased. Each pull draws a random lease token;
  `ack`/`nack` only touch rows still holding that token, so a stale ack after the lease
  expired and the message was re-leased is ignored.
* Deliveries always start at a key's oldest message and take a consecutive run, so
  several messages of one key may come in one pull, in order; a leased or delayed message
  blocks its key (`store.deliverable_keys`), which keeps FIFO per key.
* ``attempts`` counts deliveries; `ReceivedMessage.delivery_attempt` starts at 1.
  Dead-lettering after N attempts is the pipeline's decision.
* Delivery state (token, expiry, attempts) is a row in ``leases``; the message row is
  never rewritten. Acked messages and their lease rows are deleted (the writer reuses
  and later frees their pages). Every pull, ack and nack is a fixed handful of set-based
  statements (JSON arrays bound as one parameter), whatever the number of messages or keys.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import orjson

from app.broker.base import BacklogStats, BrokerUnavailable, ReceivedMessage
from app.broker.local import store

log = logging.getLogger(__name__)


# The first messages of each listed key after a given id, oldest first, with their size
# and deliveries so far: `?1` is a JSON array of [key, after_id] in the order to take
# them, `?2` the most messages per key, `?3` in all. One statement for a whole pull,
# however many keys. Bodies are not read here (the rows are sorted, so all of them would
# be held): `_BODIES_SQL` reads only those that fit the pull's byte budget.
_RUNS_SQL = """
SELECT m.id, m.ordering_key, length(m.data), m.attributes, coalesce(l.attempts, 0)
FROM json_each(?1) AS k
JOIN messages AS m ON m.id IN (
    SELECT id FROM messages
    WHERE ordering_key = json_extract(k.value, '$[0]') AND id > json_extract(k.value, '$[1]')
    ORDER BY id LIMIT ?2)
LEFT JOIN leases AS l ON l.message_id = m.id
ORDER BY k.key, m.id
LIMIT ?3
"""
_FIRST_KEYS = 16
_BODIES_SQL = "SELECT id, data, published_at FROM messages WHERE id IN (SELECT value FROM json_each(?1))"

# Lease the taken messages (`?3`: JSON array of [id, key]): one statement a pull.
_LEASE_SQL = """
INSERT INTO leases (message_id, ordering_key, not_before, attempts, lease_token)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?1, 1, ?2 FROM json_each(?3) WHERE true
ON CONFLICT (message_id) DO UPDATE
SET not_before = excluded.not_before, lease_token = excluded.lease_token, attempts = attempts + 1
"""

# The lease rows still held by the given handles (JSON array of [id, token]).
_HELD = "(message_id, lease_token) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?{n}))"
_ACK_LEASES_SQL = f"DELETE FROM leases WHERE {_HELD.format(n=1)} RETURNING message_id"
_ACK_MESSAGES_SQL = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?1))"
_NACK_SQL = f"UPDATE leases SET not_before = ?1, lease_token = NULL WHERE {_HELD.format(n=2)}"
_RETURN_SQL = "UPDATE leases SET not_before = 0, lease_token = NULL WHERE lease_token IN (SELECT value FROM json_each(?1))"


class _Lease:
    """One pull's lease being taken: runs of consecutive messages per key, within a byte budget."""

    def __init__(self, conn: sqlite3.Connection, token: int, max_messages: int, max_bytes: int) -> None:
        self.conn = conn
        self.token = token
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.taken: dict[str, list[tuple[int, str, int]]] = {}  # key -> (id, attributes, attempts)
        self.last_id: dict[str, int] = {}
        self.total = 0
        self.nbytes = 0

    def full(self) -> bool:
        return self.total >= self.max_messages or self.nbytes >= self.max_bytes

    def take_runs(self, starts: list[tuple[str, int]]) -> None:
        """Take the messages of each key following its start id, keys in the given order.

        A key's run stops at the first message over the byte budget (FIFO: no later one is
        taken). The budget may be exceeded only by the first message of the whole pull, so a
        message bigger than the budget is still delivered.
        """
        room = self.max_messages - self.total
        if not starts or room <= 0:
            return
        params = (orjson.dumps(starts).decode(), room, room)
        stopped: set[str] = set()
        for message_id, key, size, attributes, attempts in self.conn.execute(_RUNS_SQL, params).fetchall():
            if self.full():
                break
            if key in stopped:
                continue
            if self.nbytes + size > self.max_bytes and self.total:
                stopped.add(key)
                continue
            self.nbytes += size
            self.total += 1
            self.last_id[key] = message_id
            self.taken.setdefault(key, []).append((message_id, attributes, attempts))

    def mark_leased(self, expiry: float) -> list[ReceivedMessage]:
        """Lease every taken message (token, expiry, attempt) in one statement, then read their bodies in one."""
        ids = [(message_id, key) for key, got in self.taken.items() for message_id, _, _ in got]
        if not ids:
            return []
        self.conn.execute(_LEASE_SQL, (expiry, self.token, orjson.dumps(ids).decode()))
        bodies = {
            message_id: (data, published_at)
            for message_id, data, published_at in self.conn.execute(
                _BODIES_SQL, (orjson.dumps([i for i, _ in ids]).decode(),)
            ).fetchall()
        }
        return [
            ReceivedMessage(
                message_id=str(message_id),
                data=bytes(bodies[message_id][0]),
                attributes=orjson.loads(attributes),
                ordering_key=key,
                delivery_attempt=attempts + 1,
                handle=(message_id, self.token),
                published_at=bodies[message_id][1],
            )
            for key, got in self.taken.items()
            for message_id, attributes, attempts in got
        ]


class LeaseStore:
    """Leases, acks and nacks over the subscriber's connection; remembers its tokens to return them on close."""

    # One pull returns at most this many bytes of message data (at least one message).
    # Bounds the subscriber's memory: decoded activities take ~10x their JSON size, and
    # ~50 messages of 500 activities per pull already amortize the per-pull costs.
    max_pull_bytes = 4 * 1024 * 1024
    poll_interval_seconds = 0.02
    busy_timeout = 5.0

    def __init__(self, path: Path, *, ack_deadline: float) -> None:
        self.path = path
        self.ack_deadline = ack_deadline
        self._closed = False
        self._lock = threading.RLock()
        self._conn_: sqlite3.Connection | None = None
        self._tokens: dict[int, float] = {}  # lease tokens issued by this instance -> expiry
        self._last_pull_found = False  # skip the lock-free look while draining a backlog

    def open(self) -> None:
        """Open the connection now (creating the file and schema); raises if the file is unusable."""
        with self._lock:
            try:
                self._conn()
            except BaseException:
                self._drop_conn()
                raise

    def _conn(self) -> sqlite3.Connection:
        if self._conn_ is None:
            # A small page cache: message pages are read once, and a big cache only kept
            # them (32 MiB: ~35 MB more peak RSS on a 1M drain, no faster); 4 MiB still
            # holds the upper index levels of a backlog of millions.
            self._conn_ = store.connect(
                self.path, synchronous="NORMAL", busy_timeout=self.busy_timeout, cache_mib=4
            )
        return self._conn_

    def _drop_conn(self) -> None:
        conn, self._conn_ = self._conn_, None
        store.close_quietly(conn)

    # ------------------------------------------------------------------ pull
    def pull(self, max_messages: int, timeout: float) -> list[ReceivedMessage]:
        """Lease up to `max_messages` (FIFO per key), waiting up to `timeout` for the first."""
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            messages, next_due = self._try_lease(max_messages)
            if messages:
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return []
            pause = min(self.poll_interval_seconds, remaining)
            if next_due is not None:
                pause = min(pause, max(0.001, next_due - time.time()))
            time.sleep(pause)

    def _try_lease(self, max_messages: int) -> tuple[list[ReceivedMessage], float | None]:
        """One attempt: (leased messages, when the next blocked key frees if none are ready)."""
        with self._lock:
            if self._closed:
                return [], None
            try:
                conn = self._conn()
                if not self._last_pull_found:
                    # Idle: look without taking the write lock first (publishers keep going).
                    ready, next_due = store.deliverable_keys(conn, time.time(), 1)
                    if not ready:
                        return [], next_due
                with store.immediate_transaction(conn, self.busy_timeout, busy_timeout=self.busy_timeout):
                    messages = self._lease(conn, max_messages)
            except sqlite3.Error as exc:
                self._drop_conn()
                self._last_pull_found = False
                raise BrokerUnavailable(f"local broker pull failed: {exc}") from exc
            self._last_pull_found = bool(messages)
            return messages, None

    def _lease(self, conn: sqlite3.Connection, max_messages: int) -> list[ReceivedMessage]:
        """Holding the write lock: whole runs of the keys with the oldest heads first.

        A key's run goes to the subscriber as one table apply, whose cost hardly depends
        on its length, so a pull of whole runs over few keys drains a many-table backlog
        with few applies (a fair share of one or two messages per key made one apply per
        message). Fairness comes from the order: a key taken now is leased, so the next
        pull starts with the keys waiting longest.
        """
        now = time.time()
        lease = _Lease(conn, secrets.randbits(62), max_messages, self.max_pull_bytes)
        # The first keys usually fill the pull, and a statement reads the runs of every key
        # it is given: ask for a few keys first, then for about as many more as the runs
        # seen so far say will fill the rest (at least _FIRST_KEYS more each round).
        seen, limit = 0, _FIRST_KEYS
        while True:
            keys, _ = store.deliverable_keys(conn, now, limit)
            lease.take_runs([(key, head - 1) for key, head in keys[seen:]])
            if lease.full() or len(keys) < limit or limit >= max_messages:
                break
            per_key = max(1.0, lease.total / len(keys))
            more = int((max_messages - lease.total) / per_key * 1.25) + 1
            seen, limit = len(keys), min(len(keys) + max(_FIRST_KEYS, more), max_messages)
        expiry = now + self.ack_deadline
        messages = lease.mark_leased(expiry)
        if messages:
            self._remember_token(lease.token, expiry)
        return messages

    def _remember_token(self, token: int, expiry: float) -> None:
        now = time.time()
        if len(self._tokens) > 64:
            for t, e in list(self._tokens.items()):
                if e <= now:
                    del self._tokens[t]
        self._tokens[token] = expiry

    # ------------------------------------------------------------------ ack / nack
    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Delete the messages; a handle whose lease was taken over by another pull is ignored."""
        handles = _handles(messages)
        if handles:
            self._write(self._ack, handles, "ack")

    @staticmethod
    def _ack(conn: sqlite3.Connection, handles: str) -> None:
        acked = [row[0] for row in conn.execute(_ACK_LEASES_SQL, (handles,))]
        if acked:
            conn.execute(_ACK_MESSAGES_SQL, (orjson.dumps(acked).decode(),))

    def nack(self, messages: Sequence[ReceivedMessage], delay_seconds: float = 0.0) -> None:
        """Make the messages deliverable again after `delay_seconds` (their key waits too)."""
        handles = _handles(messages)
        if handles:
            when = time.time() + max(0.0, delay_seconds)
            self._write(lambda conn, held: conn.execute(_NACK_SQL, (when, held)), handles, "nack")

    def _write(self, statements: Callable[[sqlite3.Connection, str], object], handles: str, what: str) -> None:
        with self._lock:
            try:
                conn = self._conn()
                with store.immediate_transaction(conn, self.busy_timeout, busy_timeout=self.busy_timeout):
                    statements(conn, handles)
            except sqlite3.Error as exc:
                self._drop_conn()
                raise BrokerUnavailable(f"local broker {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ backlog / close
    def backlog(self) -> BacklogStats:
        """Unacked messages (leased ones included) and the age of the oldest."""
        with self._lock:
            try:
                conn = self._conn()
                count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                row = conn.execute("SELECT published_at FROM messages ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                self._drop_conn()
                raise BrokerUnavailable(f"local broker backlog failed: {exc}") from exc
        oldest = None if row is None else max(0.0, time.time() - row[0])
        return BacklogStats(messages=int(count), oldest_age_seconds=oldest)

    def close(self) -> None:
        """Stop pulling, give this instance's outstanding leases back, close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._return_leases()
            self._drop_conn()

    def _return_leases(self) -> None:
        now = time.time()
        tokens = [t for t, e in self._tokens.items() if e > now]
        self._tokens.clear()
        if not tokens or self._conn_ is None:
            return
        conn = self._conn_
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_RETURN_SQL, (orjson.dumps(tokens).decode(),))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.debug("could not return leases on close: %s", exc)


def _handles(messages: Sequence[ReceivedMessage]) -> str:
    """The messages' (id, token) handles as a JSON array; empty string if none."""
    out = []
    for m in messages:
        h = m.handle
        if isinstance(h, tuple) and len(h) == 2:
            out.append((int(h[0]), int(h[1])))
    return orjson.dumps(out).decode() if out else ""
