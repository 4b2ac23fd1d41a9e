"""Whole columns at once: a column's JSON values -> its Arrow array, for the common forms.

`column_array(type_name, values, max_value_bytes)` returns the Arrow array (of
`TYPES[type_name].arrow_type`) holding exactly what `TYPES[type_name].normalize` would
make of every value, or None when it cannot be sure cheaply: the column holds a form the
fast parsers leave alone (a digit string for an integer, a one-digit month, a zone name,
a base64 text ...) or a value that may be invalid. The caller
(`app.schema.columnar_validation`) then runs the per-value rules (`app.schema.validation`),
which accept the rest and word the 422. So None never means "invalid", and a parser never
accepts what the type table refuses.

The forms parsed here are a strict subset of each type's accepted forms (see
`app.schema.types`): every check is on the JSON type of each value (Arrow's own
conversions are lenient, e.g. `pa.array([True], pa.float64())` is 1.0) and, for text,
on the column's texts joined by newlines, at once (`_TextForm`: their shapes compared
as bytes, or one compiled regex; Arrow's regex kernel compiles its pattern on every
call, which costs more than a small request's whole validation), then Arrow's cast (or
Python's ISO parser for a few values), which refuses impossible dates and times itself.
"""

from __future__ import annotations

import array
import re
from datetime import date, datetime
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from app.schema.columnar import to_arrow
from app.schema.types import TYPES

__all__ = ["column_array"]

NoneType = type(None)


class _TextForm:
    """Texts of one form, given as a regex `item` that never matches a newline.

    A column passes when every text matches. Two ways to check, both over all the texts
    joined by newlines at once: the common column, whose texts all have one of
    `shapes` (digits as 9, e.g. "9999-99-99 99:99:99"), is checked by comparing bytes;
    otherwise one regex match. The shapes leave ranges (month 13, hour 24) to Arrow's
    conversion, which refuses them; it takes year 0, so `no_year_zero` refuses it here.
    """

    def __init__(self, item: str, shapes: Iterable[str], no_year_zero: bool) -> None:
        self.pattern = re.compile(rf"(?:{item}\n)*{item}")
        self.shapes = frozenset(shape.encode("ascii") for shape in shapes)
        self.no_year_zero = no_year_zero

    def matches(self, texts: Sequence[str]) -> bool:
        joined = "\n".join(texts)
        if joined.isascii():
            data = joined.encode("ascii")
            if self.no_year_zero and (data.startswith(b"0000") or b"\n0000" in data):
                return False
            shaped = data.translate(_DIGITS_AS_9)
            end = shaped.find(b"\n")
            shape = shaped if end < 0 else shaped[:end]
            if shape in self.shapes and shaped == (shape + b"\n") * (len(texts) - 1) + shape:
                return True
        return self.pattern.fullmatch(joined) is not None


_DIGITS_AS_9 = bytes(ord("9") if chr(b).isdigit() else b for b in range(256))
_FRACTIONS = [""] + ["." + "9" * k for k in range(1, 7)]
_TIME_SHAPES = ["99:99:99" + f for f in _FRACTIONS]
_DATE_TIME_SHAPES = ["9999-99-99" + sep + t for sep in "T " for t in _TIME_SHAPES]

_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001 to 9999
_DATE = _YEAR + r"-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"  # Arrow refuses a day past the month's end
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
_ZONE = r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"

_DATES = _TextForm(_DATE, ["9999-99-99"], no_year_zero=True)
_TIMES = _TextForm(_TIME, _TIME_SHAPES, no_year_zero=False)
_DATETIMES = _TextForm(rf"{_DATE}(?:[T ]{_TIME})?", ["9999-99-99", *_DATE_TIME_SHAPES], no_year_zero=True)
_ZONED_TIMESTAMPS = _TextForm(
    rf"{_DATE}[T ]{_TIME}{_ZONE}",
    [s + z for s in _DATE_TIME_SHAPES for z in ("Z", "+99:99", "-99:99")],
    no_year_zero=True,
)
# numeric: <= 29 integer and 9 fraction digits (shapes vary too much to list)
_NUMERICS = _TextForm(r"-?[0-9]{1,29}(?:\.[0-9]{1,9})?", [], no_year_zero=False)

# A timestamp is within 0001-01-01 and 9999-12-31 in UTC; an offset can move a valid
# local time past either end.
_MIN_TIMESTAMP_US = -62135596800 * 10**6
_MAX_TIMESTAMP_US = 253402300799 * 10**6 + 999999

_NULL = {NoneType}
_TEXT = {str}
_TEXT_OR_NULL = {str, NoneType}

# (values, the set of their Python types, max_value_bytes) -> array or None
_Parser = Callable[[Sequence[Any], set, int], "pa.Array | None"]


def _texts(values: Sequence[Any], kinds: set[type], form: _TextForm) -> bool:
    """True when every value is null or a str and every str is of the form."""
    if kinds == _TEXT:
        present = values
    elif kinds == _TEXT_OR_NULL:
        present = [v for v in values if v is not None]
    else:
        return False
    return form.matches(present)


def _plain(type_name: str, *accepted: type, packed: str = "") -> _Parser:
    """Values of exactly these Python types (or null), converted by Arrow: ints, floats, booleans.

    `packed`: the `array` typecode of a column of `accepted[0]` only, with no null, which
    is packed into the Arrow buffer directly (a few microseconds less than `pa.array`,
    which counts on a small request).
    """
    arrow_type = TYPES[type_name].arrow_type
    allowed = set(accepted) | {NoneType}
    only = {accepted[0]}

    def parse(values: Sequence[Any], kinds: set[type], max_value_bytes: int) -> pa.Array | None:
        if not kinds <= allowed:
            return None
        if packed and kinds == only:
            # array("q") refuses an int outside INT64 (OverflowError) like Arrow does
            return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(array.array(packed, values))])
        # Arrow refuses an int outside INT64 and, for float64, one no double holds exactly
        # (normalize_float would round it): both go to the per-value rules.
        return pa.array(values, arrow_type)

    return parse


def _string(values: Sequence[Any], kinds: set[type], max_value_bytes: int) -> pa.Array | None:
    if not kinds <= _TEXT_OR_NULL:
        return None
    strings = pa.array(values, pa.string())  # UnicodeEncodeError for an unpaired surrogate
    if (
        strings.get_total_buffer_size() > max_value_bytes
        and pc.max(pc.binary_length(strings)).as_py() > max_value_bytes
    ):
        return None  # the per-value rules raise the limit with the value's location
    return strings


def _text_form(type_name: str, form: _TextForm) -> _Parser:
    """Text in a form Arrow's cast reads exactly as the normalizer does (as `to_arrow` reads canonical text)."""
    if type_name == "time":
        convert = lambda values: to_arrow("time", values)  # noqa: E731
    else:
        convert = _from_text(
            TYPES[type_name].arrow_type, date.fromisoformat if type_name == "date" else datetime.fromisoformat
        )

    def parse(values: Sequence[Any], kinds: set[type], max_value_bytes: int) -> pa.Array | None:
        if not _texts(values, kinds, form):
            return None
        return convert(values)

    return parse


# Up to this many values, Python's ISO parser and `pa.array` take less time than one call
# of Arrow's cast kernel (a README-sized request); beyond, the cast is much faster.
_FEW = 16


def _from_text(
    arrow_type: pa.DataType, parse_one: Callable[[str], Any] | None = None
) -> Callable[[Sequence[Any]], pa.Array]:
    """Texts already checked to be in one of the forms (`_TextForm`) as an array of the type.

    `parse_one`: Python's ISO parser for them, which reads those forms as Arrow does
    (digit fields, a fraction of 1-6 digits; it refuses year 0 and impossible dates too).
    """
    # The cast function and its options made once: `pc.cast` builds them on every call.
    call = pc.get_function("cast").call
    options = [pc.CastOptions.safe(arrow_type)]

    def convert(values: Sequence[Any]) -> pa.Array:
        if parse_one is not None and len(values) <= _FEW:
            return pa.array([None if v is None else parse_one(v) for v in values], arrow_type)
        return call([pa.array(values, pa.string())], *options)

    return convert


_naive_timestamps = _from_text(TYPES["datetime"].arrow_type, datetime.fromisoformat)  # zone-less wall time
_zoned_timestamps = _from_text(TYPES["timestamp"].arrow_type)
_numerics = _from_text(TYPES["numeric"].arrow_type)


def _timestamp(values: Sequence[Any], kinds: set[type], max_value_bytes: int) -> pa.Array | None:
    arrow_type = TYPES["timestamp"].arrow_type
    if _texts(values, kinds, _DATETIMES):  # no zone: UTC
        return _naive_timestamps(values).view(arrow_type)  # the same microseconds, read as UTC
    if not _texts(values, kinds, _ZONED_TIMESTAMPS):
        return None
    instants = _zoned_timestamps(values)
    bounds = pc.min_max(instants.cast(pa.int64())).as_py()
    if bounds["min"] < _MIN_TIMESTAMP_US or bounds["max"] > _MAX_TIMESTAMP_US:
        return None
    return instants


def _numeric(values: Sequence[Any], kinds: set[type], max_value_bytes: int) -> pa.Array | None:
    arrow_type = TYPES["numeric"].arrow_type
    if kinds <= {int, NoneType}:
        return pa.array(values, pa.int64()).cast(arrow_type)  # INT64 has at most 19 digits
    if _texts(values, kinds, _NUMERICS):
        return _numerics(values)
    return None


_PARSERS: dict[str, _Parser] = {
    "string": _string,
    "integer": _plain("integer", int, packed="q"),
    "float": _plain("float", float, int, packed="d"),
    "boolean": _plain("boolean", bool),
    "numeric": _numeric,
    "timestamp": _timestamp,
    "date": _text_form("date", _DATES),
    "time": _text_form("time", _TIMES),
    "datetime": _text_form("datetime", _DATETIMES),
}
assert _PARSERS.keys() <= TYPES.keys()

_CONVERSION_ERRORS = (pa.ArrowException, OverflowError, UnicodeEncodeError, ValueError, TypeError)


def column_array(type_name: str, values: Sequence[Any], max_value_bytes: int) -> pa.Array | None:
    """The column as its Arrow array when every value is in a fast form, else None (see the module docstring)."""
    kinds = set(map(type, values))
    if kinds == _NULL:
        return pa.nulls(len(values), TYPES[type_name].arrow_type)
    parse = _PARSERS.get(type_name)
    if parse is None:
        return None
    try:
        return parse(values, kinds, max_value_bytes)
    except _CONVERSION_ERRORS:
        return None
