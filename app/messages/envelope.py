"""The decoded form of one message, as the subscriber hands it to the warehouse."""

from __future__ import annotations

from app.schema.activity import Activity
from app.schema.columnar import ActivityRun


class Envelope:
    """A decoded message: the activities of one (request, table) chunk, in order.

    A v2 message arrives as `runs` (columns, `app.schema.columnar.ActivityRun`), a v1
    message as `activities`; each is derived from the other only when asked for, so the
    columnar path never builds a Python object per value.
    """

    __slots__ = ("dedup_id", "table", "_activities", "_runs", "delivery_attempt")

    def __init__(
        self,
        dedup_id: str,
        table: str,
        activities: list[Activity] | None = None,
        delivery_attempt: int = 1,
        *,
        runs: list[ActivityRun] | None = None,
    ) -> None:
        if activities is None and runs is None:
            raise ValueError("an Envelope needs activities or runs")
        self.dedup_id = dedup_id
        self.table = table
        self._activities = activities
        self._runs = runs
        self.delivery_attempt = delivery_attempt

    @property
    def activities(self) -> list[Activity]:
        if self._activities is None:
            self._activities = [a for run in self._runs or () for a in run.activities()]
        return self._activities

    @property
    def runs(self) -> list[ActivityRun] | None:
        """The columnar runs when the message carried them (v2); None for a v1 message."""
        return self._runs

    def __len__(self) -> int:
        if self._activities is not None:
            return len(self._activities)
        return sum(len(run) for run in self._runs or ())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return (self.dedup_id, self.table, self.delivery_attempt, self.activities) == (
            other.dedup_id,
            other.table,
            other.delivery_attempt,
            other.activities,
        )

    def __repr__(self) -> str:
        return f"Envelope(dedup_id={self.dedup_id!r}, table={self.table!r}, activities={len(self)}, delivery_attempt={self.delivery_attempt})"
