"""Replaying dead letters: check each entry would apply now, publish it again, link it.

An entry is replayed only if it would not fail again the same way:

- its activities pass the API's validator again (`validate_batch`); an undecodable
  message must now decode;
- they fit the table's current schema, planned the way the subscriber plans them
  (`plan_table`), with the entries replayed before it in the same run counted in;
- they would not overwrite or duplicate what the table got since the failure
  (`replay_check`): such an entry is replayed only with `force`, and says what it
  changes either way.

The schema comes from the running subscriber's admin port, or from the warehouse
itself when none runs. An entry that would fail stays in the store and is reported
with why. A replayed entry is published as a new batch whose id derives from the entry
(so a replay re-run after a crash re-publishes the same dedup ids and the warehouse
applies it once) and is marked with that batch id; should that batch be dead-lettered
again, the new entry links back to this one (`DeadLetter.replay_of`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from app.broker import make_broker
from app.broker.base import Broker, ReceivedMessage
from app.messages.codec import UndecodableMessage, decode_message, encode_batch, new_batch_id
from app.messages.deadletters import DeadLetter, DeadLetterStore, rejected_activity_batch_id
from app.pipeline.replay_check import what_it_would_change
from app.schema.activity import Activity
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from app.settings import Settings
from app.warehouse.base import Envelope
from app.warehouse.plan import plan_table

log = logging.getLogger("app.replay")

SCHEMA_WAIT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one entry: replayed as `batch_id`, or kept because of `problem`."""

    entry_id: int
    batch_id: str | None = None
    problem: str | None = None
    changes: str | None = None  # what a forced replay overwrites or duplicates (`replay_check`)


class TableSchemas:
    """Each table's current columns (name -> activity type), read once per replay run.

    Through the running subscriber's admin port (it holds the DuckDB file), else from
    the warehouse directly.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[str, dict[str, str] | None] = {}
        self._warehouse = None

    def get(self, table: str) -> dict[str, str] | None:
        if table not in self._cache:
            from app.admin_client import through_subscriber

            self._cache[table] = through_subscriber(
                lambda: self._via_admin(table), lambda: self._directly(table), SCHEMA_WAIT_SECONDS
            )
        return self._cache[table]

    def count(self, sql: str, params: list) -> int:
        """The count a read-only query selects, through the subscriber or directly."""
        from app.admin_client import admin_request, through_subscriber

        def via_admin() -> int:
            return int(admin_request(self.settings, "/query", {"sql": sql, "params": params})["rows"][0][0])

        def directly() -> int:
            if self._warehouse is None:
                from app.warehouse import open_read_only

                self._warehouse = open_read_only(self.settings)
            return int(self._warehouse.query(sql, params)[1][0][0])

        return through_subscriber(via_admin, directly, SCHEMA_WAIT_SECONDS)

    def _via_admin(self, table: str) -> dict[str, str] | None:
        from app.admin_client import admin_request

        return admin_request(self.settings, f"/tables/{table}")["columns"]

    def _directly(self, table: str) -> dict[str, str] | None:
        if self._warehouse is None:
            from app.warehouse import open_read_only

            self._warehouse = open_read_only(self.settings)
        return self._warehouse.table_schema(table)

    def close(self) -> None:
        if self._warehouse is not None:
            self._warehouse.close()


def replay_batch_id(entry: DeadLetter) -> str:
    """The same for every replay of this entry. A refused activity's derives from where it
    was refused, as its copy on the broker's dead-letter topic does: replayed from both, it
    applies once. Other entries' from the entry's id and creation time."""
    if entry.kind == "activity" and entry.dedup_id is not None and entry.activity_index is not None:
        return rejected_activity_batch_id(entry.dedup_id, entry.activity_index)
    return new_batch_id(f"dead-letter-replay:{entry.id}:{entry.created_at!r}")


def entry_activities(entry: DeadLetter) -> list[Activity]:
    """The entry's activities, validated again as the API validates a request.

    Raises `ValueError` saying why they cannot be replayed.
    """
    if entry.kind == "activity":
        bodies = [entry.payload_json()]
        if bodies[0] is None:
            raise ValueError("the stored activity is not JSON")
    else:
        message = ReceivedMessage(
            message_id=entry.message_id or f"dead-letter-{entry.id}", data=entry.payload,
            attributes={"dedup_id": entry.dedup_id or ""}, ordering_key=entry.table_name or "", delivery_attempt=1,
        )
        try:
            envelope = decode_message(message)
        except UndecodableMessage as exc:
            raise ValueError(f"still undecodable: {exc.__cause__ or exc}") from None
        bodies = [a.to_dict() for a in envelope.activities]
    try:
        return validate_batch({"user_activities": bodies}, max_activities=max(len(bodies), 1))
    except BatchInvalid as exc:
        # loc names the activity inside this entry ("user_activities[0].col_values[1]").
        raise ValueError("; ".join(f"{d.get('loc')}: {d['message']}" for d in exc.details) or str(exc)) from None
    except LimitExceeded as exc:
        raise ValueError(exc.message) from None


class Replayer:
    def __init__(self, settings: Settings, store: DeadLetterStore, schemas: TableSchemas) -> None:
        self.settings = settings
        self.store = store
        self.schemas = schemas
        self._broker: Broker | None = None  # opened on the first publish
        self.changes: dict[int, str] = {}  # entry id -> what replaying it changes (see `check`)

    def check(self, entries: list[DeadLetter], force: bool = False) -> dict[int, list[Activity] | str]:
        """Per entry id: the activities to publish, or why the entry would fail again (or,
        without `force`, would change what the table got since the failure). What a forced
        entry changes is in `self.changes`."""
        checked: dict[int, list[Activity] | str] = {}
        by_table: dict[str, list[tuple[DeadLetter, list[Activity]]]] = {}
        for entry in entries:
            if entry.replayed_at is not None:
                checked[entry.id] = f"already replayed as batch {entry.replayed_batch_id or '(unknown)'}"
                continue
            try:
                activities = entry_activities(entry)
            except ValueError as exc:
                checked[entry.id] = str(exc)
                continue
            checked[entry.id] = activities
            for table in dict.fromkeys(a.table for a in activities):
                by_table.setdefault(table, []).append((entry, [a for a in activities if a.table == table]))
        for table, items in by_table.items():
            try:
                columns = self.schemas.get(table)
            except Exception as exc:  # warehouse unreachable: nothing can be checked, nothing is replayed
                for entry, _ in items:
                    checked[entry.id] = f"cannot read the schema of table {table}: {exc}"
                continue
            schema = None if columns is None else {name.lower(): (name, typ) for name, typ in columns.items()}
            # Planned together, in id order, as the subscriber would apply them.
            plan = plan_table(table, schema, [Envelope(str(entry.id), table, acts) for entry, acts in items])
            for rejection in plan.rejections:
                entry_id = int(rejection.dedup_id)
                if not isinstance(checked[entry_id], str):
                    checked[entry_id] = f"would be rejected again: {rejection.reason}"
            self._check_changes(table, columns, items, checked, force)
        return checked

    def _check_changes(
        self, table: str, columns: dict[str, str] | None, items: list[tuple[DeadLetter, list[Activity]]],
        checked: dict[int, list[Activity] | str], force: bool,
    ) -> None:
        for entry, activities in items:
            if isinstance(checked[entry.id], str):
                continue
            try:
                found = [c for a in activities if (c := what_it_would_change(a, columns, self.schemas.count))]
            except Exception as exc:  # nothing known is nothing safe
                found = [f"cannot compare with table {table}: {exc}"]
            if not found:
                continue
            self.changes[entry.id] = "; ".join(found)
            if not force:
                checked[entry.id] = f"{self.changes[entry.id]}; replay with --force to apply it anyway"

    async def publish(self, entry: DeadLetter, activities: list[Activity]) -> str:
        batch_id = replay_batch_id(entry)
        if self._broker is None:
            self._broker = make_broker(self.settings)
        messages = encode_batch(activities, batch_id, self._broker.capabilities.message)
        await self._broker.publish(messages, batch_id=batch_id)
        self.store.mark_replayed(entry.id, batch_id)
        log.info("replayed dead letter %d as batch %s", entry.id, batch_id)
        return batch_id

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()


def replay(
    settings: Settings, ids: list[int] | None, progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> list[Outcome]:
    """Replay the given entries (or all not yet replayed), one `Outcome` per entry.

    Entries that would fail again are left in place, and so are those that would change
    what their table got since the failure, unless `force`. `progress(handled, total)` is
    called once before the first entry and after each one.
    """
    store = DeadLetterStore(settings.dead_letter_file)
    schemas = TableSchemas(settings)
    replayer = Replayer(settings, store, schemas)
    try:
        entries = sorted(store.get(ids) if ids else store.list(limit=1_000_000), key=lambda e: e.id)
        missing = sorted(set(ids or []) - {e.id for e in entries})
        outcomes = [Outcome(i, problem="no such dead letter") for i in missing]
        if progress:
            progress(0, len(entries))
        checked = replayer.check(entries, force)

        async def publish_all() -> None:
            for handled, entry in enumerate(entries, start=1):
                result = checked[entry.id]
                if isinstance(result, str):
                    log.warning("dead letter %d not replayed: %s", entry.id, result)
                    outcomes.append(Outcome(entry.id, problem=result))
                else:
                    batch_id = await replayer.publish(entry, result)
                    outcomes.append(Outcome(entry.id, batch_id=batch_id, changes=replayer.changes.get(entry.id)))
                if progress:
                    progress(handled, len(entries))

        asyncio.run(publish_all())
    finally:
        replayer.close()
        schemas.close()
        store.close()
    return sorted(outcomes, key=lambda o: o.entry_id)
