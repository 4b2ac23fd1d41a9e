"""Activities as columns: canonical values <-> Arrow arrays, and runs of same-shape activities.

`to_arrow` and `to_canonical` convert the canonical values of one column type (see
`app.schema.types`) to its `arrow_type` and back, losslessly:
`to_canonical(t, to_arrow(t, values)) == values` for canonical values of type `t`.

An `ActivityRun` is consecutive activities of one table with the same operation, column
names and column types, held as one Arrow record batch (one column per `col_names`
entry). It is what messages carry (`app.messages.codec`) and what the warehouses write.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from app.schema.activity import Activity
from app.schema.types import TYPES

__all__ = ["ActivityRun", "to_arrow", "to_canonical", "record_batch", "runs_of", "field_name"]


# --- canonical -> Arrow ---------------------------------------------------------------


def _b64_bytes(values: list[Any]) -> list[Any]:
    decode = binascii.a2b_base64
    return [None if v is None else decode(v) for v in values]


def _floats(values: list[Any]) -> list[Any]:
    # "NaN" / "Infinity" / "-Infinity" are the canonical non-finite floats; float() parses them.
    return [float(v) if v.__class__ is str else v for v in values]


def _json_texts(values: list[Any]) -> list[Any]:
    # Sorted keys: the text is canonical, so warehouses can compare records as text.
    dumps = orjson.dumps
    opt = orjson.OPT_SORT_KEYS
    return [None if v is None else dumps(v, option=opt).decode() for v in values]


def _cast_text(arrow_type: pa.DataType) -> Callable[[list[Any]], pa.Array]:
    # The canonical text of these types is ISO 8601, which Arrow's cast parses exactly.
    def convert(values: list[Any]) -> pa.Array:
        return pc.cast(pa.array(values, pa.string()), arrow_type)

    return convert


def _times(values: list[Any]) -> pa.Array:
    # Arrow has no string -> time64 cast: parse as a time on 1970-01-01, keep the time of day.
    text = pa.array(values, pa.string())
    moments = pc.cast(pc.binary_join_element_wise("1970-01-01T", text, ""), pa.timestamp("us"))
    return pc.cast(moments, TYPES["time"].arrow_type)


def _plain(arrow_type: pa.DataType) -> Callable[[list[Any]], pa.Array]:
    def convert(values: list[Any]) -> pa.Array:
        return pa.array(values, arrow_type)

    return convert


def _then(prepare: Callable[[list[Any]], list[Any]], arrow_type: pa.DataType) -> Callable[[list[Any]], pa.Array]:
    def convert(values: list[Any]) -> pa.Array:
        return pa.array(prepare(values), arrow_type)

    return convert


_TO_ARROW: dict[str, Callable[[list[Any]], pa.Array]] = {
    "string": _plain(pa.string()),
    "bytes": _then(_b64_bytes, TYPES["bytes"].arrow_type),
    "integer": _plain(TYPES["integer"].arrow_type),
    "float": _then(_floats, TYPES["float"].arrow_type),
    "numeric": _cast_text(TYPES["numeric"].arrow_type),
    "bignumeric": _plain(TYPES["bignumeric"].arrow_type),
    "boolean": _plain(TYPES["boolean"].arrow_type),
    "timestamp": _cast_text(TYPES["timestamp"].arrow_type),
    "date": _cast_text(TYPES["date"].arrow_type),
    "time": _times,
    "datetime": _cast_text(TYPES["datetime"].arrow_type),
    "geography": _plain(TYPES["geography"].arrow_type),
    "record": _then(_json_texts, TYPES["record"].arrow_type),
}


def to_arrow(type_name: str, values: list[Any]) -> pa.Array:
    """Canonical values of `type_name` (None allowed) as an array of its Arrow type."""
    return _TO_ARROW[type_name](values)


# --- Arrow -> canonical ---------------------------------------------------------------

_ZERO_FRACTION = r"\.000000$"  # RE2: $ is the end of the text


def _b64_texts(array: pa.Array) -> list[Any]:
    encode = base64.b64encode
    return [None if v is None else encode(v).decode("ascii") for v in array.to_pylist()]


def _float_texts(array: pa.Array) -> list[Any]:
    out = array.to_pylist()
    for i, v in enumerate(out):
        if v is not None and not math.isfinite(v):
            out[i] = "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return out


def decimal_text(value: Decimal) -> str:
    """A Decimal as the canonical plain decimal: no exponent, no trailing fraction zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        return "0"
    return text


def _decimal_texts(array: pa.Array) -> list[Any]:
    return [None if v is None else decimal_text(v) for v in array.to_pylist()]


def _formatted(fmt: str, drop_zero_fraction: bool) -> Callable[[pa.Array], list[Any]]:
    def convert(array: pa.Array) -> list[Any]:
        text = pc.strftime(array, fmt)
        if drop_zero_fraction:
            text = pc.replace_substring_regex(text, _ZERO_FRACTION, "")
        return text.to_pylist()

    return convert


def _time_texts(array: pa.Array) -> list[Any]:
    return pc.replace_substring_regex(pc.cast(array, pa.string()), _ZERO_FRACTION, "").to_pylist()


def _date_texts(array: pa.Array) -> list[Any]:
    return pc.cast(array, pa.string()).to_pylist()


def _records(array: pa.Array) -> list[Any]:
    loads = orjson.loads
    return [None if v is None else loads(v) for v in array.to_pylist()]


def _pylist(array: pa.Array) -> list[Any]:
    return array.to_pylist()


_TO_CANONICAL: dict[str, Callable[[pa.Array], list[Any]]] = {
    "string": _pylist,
    "bytes": _b64_texts,
    "integer": _pylist,
    "float": _float_texts,
    "numeric": _decimal_texts,
    "bignumeric": _pylist,
    "boolean": _pylist,
    # %S of a microsecond timestamp prints the six fraction digits too
    "timestamp": _formatted("%Y-%m-%dT%H:%M:%SZ", drop_zero_fraction=False),
    "date": _date_texts,
    "time": _time_texts,
    "datetime": _formatted("%Y-%m-%dT%H:%M:%S", drop_zero_fraction=True),
    "geography": _pylist,
    "record": _records,
}
assert _TO_ARROW.keys() == _TO_CANONICAL.keys() == TYPES.keys()


def to_canonical(type_name: str, array: pa.Array | pa.ChunkedArray) -> list[Any]:
    """An array of `type_name`'s Arrow type as canonical Python values (what `normalize` returns)."""
    return _TO_CANONICAL[type_name](array)


# --- runs -----------------------------------------------------------------------------


def field_name(position: int) -> str:
    """Batch fields are named by position: column names are checked by the planner, not Arrow."""
    return str(position)


def record_batch(col_types: Sequence[str], columns: Sequence[pa.Array]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(list(columns), names=[field_name(i) for i in range(len(columns))])


@dataclass(slots=True)
class ActivityRun:
    """Consecutive activities of one table with one operation and one (names, types) shape.

    `batch` has one column per `col_names` entry, in order, typed by `TYPES[t].arrow_type`,
    one row per activity.
    """

    table: str
    operation: str
    col_names: list[str]
    col_types: list[str]
    batch: pa.RecordBatch
    key: list[str] | None = None  # an upsert run's key columns (names as in col_names)

    def __len__(self) -> int:
        return self.batch.num_rows

    def column_values(self) -> list[list[Any]]:
        """Each column as canonical values."""
        return [to_canonical(t, self.batch.column(i)) for i, t in enumerate(self.col_types)]

    def activities(self) -> list[Activity]:
        columns = self.column_values()
        rows = zip(*columns) if columns else ()
        key = self.key
        return [
            Activity(self.operation, self.table, list(self.col_names), list(self.col_types), list(row), None if key is None else list(key))  # type: ignore[arg-type]
            for row in rows
        ]


def runs_of(activities: Iterable[Activity]) -> list[ActivityRun]:
    """Validated activities as runs: grouped by table (first-seen order), then consecutive
    activities of the same operation, names, types and key; each table's order is kept."""
    by_table: dict[str, list[list[Activity]]] = {}
    for a in activities:
        groups = by_table.setdefault(a.table, [])
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and last.operation == a.operation
            and last.col_types == a.col_types
            and last.col_names == a.col_names
            and last.key == a.key
        ):
            groups[-1].append(a)
        else:
            groups.append([a])
    runs: list[ActivityRun] = []
    for table, groups in by_table.items():
        for group in groups:
            first = group[0]
            columns = [to_arrow(t, [a.col_values[i] for a in group]) for i, t in enumerate(first.col_types)]
            runs.append(
                ActivityRun(
                    table,
                    first.operation,
                    list(first.col_names),
                    list(first.col_types),
                    record_batch(first.col_types, columns),
                    None if first.key is None else list(first.key),
                )
            )
    return runs
