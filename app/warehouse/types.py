"""A warehouse's type mapper: activity type <-> its column type, both ways (after dlt's TypeMapper).

Each backend builds one from its own column types; the reverse lookup is built once,
here. Where two activity types share a column type (DuckDB keeps bignumeric as
VARCHAR, like string), the reverse reads the one listed first in `app.schema.types`;
a backend that must tell them apart records the activity type itself (DuckDB's
`_ingest_columns`, BigQuery's column descriptions).
"""

from __future__ import annotations

from typing import Collection, Mapping

from app.schema.types import TYPES


class TypeMapper:
    def __init__(
        self,
        column_types: Mapping[str, str],
        aliases: Mapping[str, str] | None = None,
        shared: Collection[str] = (),
    ) -> None:
        """`column_types`: every activity type -> its column type; `aliases`: other
        spellings the warehouse reports (e.g. legacy names) -> activity type; `shared`:
        the activity types declared as stored in another activity type's column type
        (they read back as that one); every other type must read back as itself."""
        if set(column_types) != set(TYPES):
            raise ValueError(f"type mapper out of date: {sorted(set(TYPES) ^ set(column_types))}")
        self.shared = frozenset(shared)
        self._column_types = dict(column_types)
        reverse: dict[str, str] = {}
        for name in TYPES:  # first listed wins a shared column type
            reverse.setdefault(column_types[name].upper(), name)
        reverse.update({spelling.upper(): name for spelling, name in (aliases or {}).items()})
        self._activity_types = reverse
        wrong = sorted(t for t in TYPES if (reverse[column_types[t].upper()] != t) != (t in self.shared))
        if wrong:
            raise ValueError(f"declared shared column types do not match the mapping: {wrong}")

    def column_type(self, activity_type: str) -> str:
        return self._column_types[activity_type]

    def activity_type_of(self, column_type: str | None) -> str | None:
        """The activity type stored as `column_type`; None if none is."""
        if not column_type:
            return None
        return self._activity_types.get(column_type.upper())
