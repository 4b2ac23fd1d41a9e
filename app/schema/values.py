"""Per-type value validation and normalization, one normalizer per activity column type.

Every `normalize_<type>(value)` takes a JSON-decoded value that is not `None` (the caller
handles null) and returns the canonical value listed in `app.schema.types`, or raises
`ValueError` whose message says what was wrong (range, precision or format). The
normalizers never raise anything else, never mutate their input and are deterministic:
normalizing a canonical value returns it unchanged.

The accepted forms are BigQuery's JSON-ingestion forms (insertAll and
JSON load jobs) with BigQuery's meaning, including what the official clients send
(google-cloud-bigquery's `_helpers._SCALAR_VALUE_TO_JSON_ROW`: integers and booleans as
strings, non-finite floats as `str(float)`, JSON columns as `json.dumps` text). A value
is stored exactly as sent or refused, never rounded or truncated. The per-type table of
forms is in `app.schema.types`; tests in tests/schema/test_values.py.

Numbers: decode request bodies with `loads_exact`, which keeps every number's exact
value: a JSON number that no float holds exactly (more than ~17 significant digits, or
an exponent beyond the float range) arrives as a `JsonNumber` carrying its text, and
integers as exact Python ints. So every float reaching a normalizer equals, as
`repr(float)`, the decimal the client wrote.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import shapely
import shapely.wkb
import shapely.wkt
from shapely.geometry import shape as _geojson_shape

__all__ = [
    "JsonNumber",
    "loads_exact",
    "brief",
    "normalize_string",
    "normalize_bytes",
    "normalize_integer",
    "normalize_float",
    "normalize_numeric",
    "normalize_bignumeric",
    "normalize_boolean",
    "normalize_timestamp",
    "normalize_date",
    "normalize_time",
    "normalize_datetime",
    "normalize_geography",
    "normalize_record",
]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

_BRIEF_CHARS = 50


# --- exact JSON decoding -----------------------------------------------------------


class JsonNumber:
    """The text of a JSON number that no float holds exactly, e.g. 0.12345678901234567891.

    Produced only by `loads_exact`; never canonical (JSON encoders refuse it).
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return type(other) is JsonNumber and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"JsonNumber({self.text!r})"


# A number with at most 15 significant digits and a 1- or 2-digit exponent converts to a
# float and back exactly (DBL_DIG = 15), so orjson's floats are exact unless the body has
# a run of 16 digits/points or a 3-digit exponent; only then is the slower exact decoder
# needed. (orjson also turns integers beyond 64 bits into floats, and those have 20+
# digits.) The scan maps digits and "." to "1", e/E to "e", drops + and - and searches the
# result: ~10x faster than a regex over digit-heavy bodies. Dropping the signs makes "1e+111"
# and "1e-111" one search for "1e111" (each search is ~50 us over a 500-activity body, where
# every letter e is a candidate); runs only get longer, so nothing inexact is missed.
_SCAN_TABLE = bytes(
    ord("1") if chr(b) in "0123456789." else ord("e") if chr(b) in "eE" else ord("x")
    for b in range(256)
)
_SCAN_DROPPED = b"+-"
_LONG_RUN = b"1" * 16


def _maybe_inexact(data: bytes) -> bool:
    scanned = data.translate(_SCAN_TABLE, _SCAN_DROPPED)
    return _LONG_RUN in scanned or b"1e111" in scanned


_INT_TEXT_MAX = 4000  # Python refuses int() of more than 4300 digits


def _exact_float(text: str) -> float | JsonNumber:
    f = float(text)
    if f - f == 0.0:
        r = repr(f)
        if r == text or Decimal(r) == Decimal(text):
            return f
    return JsonNumber(text)


def _exact_int(text: str) -> int | JsonNumber:
    return int(text) if len(text) <= _INT_TEXT_MAX else JsonNumber(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_exact(raw: bytes | str) -> Any:
    """Decode JSON (UTF-8) keeping every number's exact value; ValueError if invalid.

    Integers stay exact Python ints, floats are floats only when the float equals the
    number written, anything else is a `JsonNumber`.
    """
    data = raw.encode("utf-8", "surrogatepass") if type(raw) is str else raw
    if not _maybe_inexact(data):
        return orjson.loads(data)
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_float=_exact_float, parse_int=_exact_int, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("JSON nests too deeply") from None


def _decimal_text(value: Any) -> str | None:
    """The exact decimal text of a JSON number (int, float or JsonNumber), else None."""
    t = type(value)
    if t is int:
        return str(value) if value.bit_length() < 14000 else None
    if t is float:
        return repr(value) if value - value == 0.0 else None
    if t is JsonNumber:
        return value.text
    return None


def brief(value: Any) -> str:
    """A short, safe description of any JSON-decoded value for error messages.

    Never expensive, never recursive: strings are cut to about 50 characters, containers
    are described by their size, huge integers by their digit count.
    """
    t = type(value)
    if t is str:
        if len(value) > _BRIEF_CHARS:
            return repr(value[:_BRIEF_CHARS]) + f"... ({len(value)} characters)"
        return repr(value)
    if t is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if t is int:
        if value.bit_length() > 160:
            return f"an integer with about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if t is float:
        return repr(value)
    if t is JsonNumber:
        if len(value.text) > _BRIEF_CHARS:
            return value.text[:_BRIEF_CHARS] + f"... ({len(value.text)} characters)"
        return value.text
    if t is list:
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if t is dict:
        return f"an object with {len(value)} key{'s' if len(value) != 1 else ''}"
    return f"a value of type {t.__name__}"


def _kind(value: Any) -> str:
    """The JSON kind of a value, for 'expected X, got Y' messages."""
    t = type(value)
    if t is str:
        return f"the string {brief(value)}"
    if t is bool:
        return f"the boolean {brief(value)}"
    if t is int:
        return f"the integer {brief(value)}"
    if t is float or t is JsonNumber:
        return f"the number {brief(value)}"
    return brief(value)


# --- string / bytes / record ------------------------------------------------------


def normalize_string(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, got {_kind(value)} (quote it to send it as text)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("string contains an unpaired UTF-16 surrogate (not valid Unicode text)") from None
    return value


def normalize_bytes(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a base64 string for bytes, got {_kind(value)}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        reason = str(exc).rstrip(".") or "invalid"
        raise ValueError(
            f"expected standard base64 (A-Z a-z 0-9 + /, '=' padding to a multiple of 4 characters), "
            f"got {brief(value)} ({reason})"
        ) from None
    if len(value) != (len(raw) + 2) // 3 * 4:  # b64decode tolerates excess '=' padding
        raise ValueError(
            f"expected standard base64 (A-Z a-z 0-9 + /, '=' padding to a multiple of 4 characters), "
            f"got {brief(value)} (excess padding)"
        )
    return base64.b64encode(raw).decode("ascii")


def _json_number_problem(value: Any) -> str | None:
    """Why a number inside a JSON value cannot be kept exactly, or None if it can.

    BigQuery keeps a JSON number as INT64, UINT64 or FLOAT64 and, by default
    (wide_number_mode 'exact'), refuses one it cannot store without loss:
    https://cloud.google.com/bigquery/docs/reference/standard-sql/json_functions#parse_json
    """
    t = type(value)
    if t is int:
        if INT64_MIN <= value <= UINT64_MAX:
            return None
        return (
            f"the integer {brief(value)} is outside the range a JSON column keeps exactly "
            f"({INT64_MIN} to {UINT64_MAX}); send it as a string"
        )
    if t is float:
        return None if value - value == 0.0 else f"{value!r} is not a JSON number"
    return (
        f"the number {brief(value)} has more digits (or a larger exponent) than a JSON column's "
        "FLOAT64 keeps exactly; send it as a string"
    )


def _find_inexact(value: Any) -> str | None:
    """The first problem with a number anywhere inside a JSON value (iterative walk)."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        elif t is int or t is float or t is JsonNumber:
            problem = _json_number_problem(v)
            if problem is not None:
                return problem
        elif t is not str and t is not bool and v is not None:
            return f"a value of type {t.__name__} is not JSON"
    return None


def normalize_record(value: Any) -> Any:
    t = type(value)
    if t is str:
        try:
            value = loads_exact(value)
        except ValueError as exc:
            raise ValueError(
                f"a record given as a string must be JSON text (what json.dumps produces); {brief(value)} is not "
                f"({_first_line(exc)})"
            ) from None
        if value is None:
            raise ValueError(
                "the JSON text 'null' is a JSON null, which this API cannot store apart from a missing value; "
                "send null for no value"
            )
        if type(value) is str:
            # Canonical records are decoded JSON values, and a str there would read as
            # JSON text again: a bare JSON string has no canonical form.
            raise ValueError(
                "the JSON text holds a bare JSON string; a record is a JSON object, array, number or boolean "
                "(use a string column for text)"
            )
    elif value is None:  # pragma: no cover - the caller handles null
        raise ValueError("expected a JSON value, got null")
    try:
        orjson.dumps(value)  # fast check: refuses JsonNumber and integers beyond 64 bits
    except (orjson.JSONEncodeError, TypeError, RecursionError):
        pass
    else:
        if type(value) is not float or value - value == 0.0:  # orjson writes NaN as null
            return value
    problem = _find_inexact(value)
    if problem is None:  # pragma: no cover - orjson and the walk disagree
        raise ValueError("the record cannot be carried as JSON")
    raise ValueError(f"record: {problem}")


# --- integer / float / boolean ----------------------------------------------------

_INT_STR = re.compile(r"([+-]?)0*([0-9]+)\Z")
_INT64_RANGE = "INT64 range (-9223372036854775808 to 9223372036854775807)"


def _int64(n: int, value: Any) -> int:
    if INT64_MIN <= n <= INT64_MAX:
        return n
    raise ValueError(f"integer {brief(value)} is out of {_INT64_RANGE}")


def normalize_integer(value: Any) -> int:
    t = type(value)
    if t is int:
        return _int64(value, value)
    if t is str:
        m = _INT_STR.match(value)
        if m is None:
            if _DECIMAL_STR.match(value) is not None and any(c.isdigit() for c in value):
                raise ValueError(
                    f"expected an integer, got the string {brief(value)}: a string for INT64 holds only digits "
                    "with an optional sign (no point, no exponent)"
                )
            raise ValueError(f"expected an integer, got the string {brief(value)} (only digits with an optional sign)")
        digits = m.group(2)
        if len(digits) > 19:
            raise ValueError(f"integer {brief(value)} is out of {_INT64_RANGE}")
        n = int(digits)
        return _int64(-n if m.group(1) == "-" else n, value)
    if t is float or t is JsonNumber:
        # A JSON number is a number whatever its spelling: 1e3 and 2.0 are the integers
        # 1000 and 2 (insertAll decodes numbers by value). A fraction is refused.
        text = _decimal_text(value)
        if text is None:
            raise ValueError(f"expected an integer, got the number {brief(value)}")
        try:
            d = Decimal(text)
        except InvalidOperation:  # pragma: no cover - JsonNumber texts are JSON numbers
            raise ValueError(f"expected an integer, got the number {brief(value)}") from None
        if abs(d.adjusted()) > 30:
            if d.adjusted() > 0:
                raise ValueError(f"integer {brief(value)} is out of {_INT64_RANGE}")
            raise ValueError(f"expected an integer, got the number {brief(value)}, which has a fraction")
        if d != d.to_integral_value():
            raise ValueError(f"expected an integer, got the number {brief(value)}, which has a fraction")
        return _int64(int(d), value)
    raise ValueError(f"expected an integer, got {_kind(value)}")


# BigQuery's STRING -> FLOAT64 conversion accepts [+-]inf, [+-]infinity and [+-]nan in
# any letter case; the official client sends str(float): "inf", "-inf", "nan".
# https://cloud.google.com/bigquery/docs/reference/standard-sql/conversion_functions#cast_as_floating_point
_FLOAT_SPECIAL = re.compile(r"([+-]?)(inf|infinity|nan)\Z", re.IGNORECASE)
_DECIMAL_STR = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?\Z")


def _float_of_text(text: str, value: Any) -> float:
    f = float(text)
    if f - f != 0.0:
        raise ValueError(f"number {brief(value)} is out of FLOAT64 range (about ±1.8e308)")
    if f == 0.0 and text.lstrip("+-").split("e")[0].split("E")[0].strip("0.") != "":
        raise ValueError(f"number {brief(value)} is too small for FLOAT64 (it would become 0)")
    return f


def normalize_float(value: Any) -> float | str:
    t = type(value)
    if t is float:
        if value - value == 0.0:  # finite
            return value
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if t is int:
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"number {brief(value)} is out of FLOAT64 range (about ±1.8e308)") from None
    if t is JsonNumber:
        return _float_of_text(value.text, value)
    if t is str:
        special = _FLOAT_SPECIAL.match(value)
        if special is not None:
            if special.group(2).lower() == "nan":
                return "NaN"
            return "-Infinity" if special.group(1) == "-" else "Infinity"
        m = _DECIMAL_STR.match(value)
        if m is None or not (m.group(2) or m.group(3)):
            raise ValueError(
                f"expected a number, got the string {brief(value)} "
                "(use a JSON number, a decimal string, or 'NaN', 'Infinity', '-Infinity', 'inf', '-inf', 'nan')"
            )
        return _float_of_text(value, value)
    raise ValueError(f"expected a number, got {_kind(value)}")


def normalize_boolean(value: Any) -> bool:
    if type(value) is bool:
        return value
    if type(value) is str:
        low = value.lower()
        if low == "true":
            return True
        if low == "false":
            return False
    raise ValueError(f"expected a boolean (true or false, or the strings 'true' / 'false'), got {_kind(value)}")


# --- numeric / bignumeric ---------------------------------------------------------


def _decimal(value: Any, type_name: str, max_int: int, max_frac: int) -> str:
    t = type(value)
    if t is int:
        s = str(value) if value.bit_length() < 256 else None
        if s is not None and len(s) - (value < 0) <= max_int:
            return s
        raise ValueError(f"{type_name} allows at most {max_int} integer digits, got {brief(value)}")
    if t is float:
        if value - value != 0.0:
            raise ValueError(f"{type_name} cannot be NaN or infinite")
        text = repr(value)  # exact: the body decoder keeps floats only when they equal the number sent
    elif t is JsonNumber:
        text = value.text
    elif t is str:
        text = value
    else:
        raise ValueError(f"expected a decimal number or a decimal string for {type_name}, got {_kind(value)}")

    m = _DECIMAL_STR.match(text)
    if m is None:
        raise ValueError(f"expected a decimal number for {type_name}, got {brief(value)}")
    sign, ip, fp, ex = m.groups()
    fp = fp or ""
    if not (ip or fp):
        raise ValueError(f"expected a decimal number for {type_name}, got {brief(value)}")
    digits = ip + fp
    stripped = digits.lstrip("0")
    if not stripped:
        return "0"
    point = len(ip) - (len(digits) - len(stripped))  # decimal point position within `stripped`
    if ex:
        exp_digits = ex.lstrip("+-").lstrip("0")
        if len(exp_digits) > 6:
            raise ValueError(f"{type_name} {brief(value)} is out of range (exponent too large)")
        point += -int(exp_digits or "0") if ex[0] == "-" else int(exp_digits or "0")
    digits = stripped.rstrip("0")
    n_int = point if point > 0 else 0
    n_frac = len(digits) - point if len(digits) > point else 0
    if n_int > max_int:
        raise ValueError(f"{type_name} allows at most {max_int} integer digits, got {n_int} in {brief(value)}")
    if n_frac > max_frac:
        raise ValueError(
            f"{type_name} allows at most {max_frac} fraction digits, got {n_frac} in {brief(value)} "
            "(precision: round it before sending)"
        )
    if point <= 0:
        out = "0." + "0" * -point + digits
    elif point >= len(digits):
        out = digits + "0" * (point - len(digits))
    else:
        out = digits[:point] + "." + digits[point:]
    return "-" + out if sign == "-" else out


def normalize_numeric(value: Any) -> str:
    return _decimal(value, "numeric", 29, 9)


def normalize_bignumeric(value: Any) -> str:
    return _decimal(value, "bignumeric", 38, 38)


# --- dates and times --------------------------------------------------------------
#
# BigQuery's canonical formats (https://cloud.google.com/bigquery/docs/reference/standard-sql/data-types):
#   date      YYYY-[M]M-[D]D
#   time      [H]H:[M]M:[S]S[.F]
#   datetime  YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.F]]
#   timestamp YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.F]][time zone], the zone being Z, an
#             offset (+|-)H[H][:M[M]] or a zone name such as UTC or America/Los_Angeles,
#             optionally after a space; no zone means UTC. JSON loads also take
#             YYYY/MM/DD dates for timestamps and epoch seconds as a JSON number
#             (https://cloud.google.com/bigquery/docs/loading-data-cloud-storage-json).

_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_NAMES = (
    "", "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

_DATE_PART = r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})"
_TIME_PART = r"([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})(?:\.([0-9]+))?"
_DATE = re.compile(_DATE_PART + r"\Z")
_TIME = re.compile(_TIME_PART + r"\Z")
_DATETIME = re.compile(_DATE_PART + r"(?:[Tt ]" + _TIME_PART + r")?\Z")
_TIMESTAMP = re.compile(
    r"([0-9]{4})([-/])([0-9]{1,2})\2([0-9]{1,2})"
    r"(?:[Tt ]" + _TIME_PART + r"(?: ?(?:([Zz])|([+-])([0-9]{1,2})(?::([0-9]{1,2}))?|([A-Za-z][A-Za-z0-9_+\-/]*)))?)?\Z"
)
_ZONE_SUFFIX = re.compile(
    r"[0-9]:[0-9]{1,2}(?:\.[0-9]*)?\s*(?:[Zz]|[+-][0-9]{1,2}(?::?[0-9]{2})?|[A-Za-z][A-Za-z0-9_+\-/]*)\Z"
)
_EPOCH = datetime(1970, 1, 1)
_MIN_EPOCH_US = (datetime(1, 1, 1) - _EPOCH) // timedelta(microseconds=1)
_MAX_EPOCH_US = (datetime(9999, 12, 31, 23, 59, 59, 999999) - _EPOCH) // timedelta(microseconds=1)
_TIMESTAMP_FORMS = (
    "'YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.F]][Z | ±H[H][:M[M]] | zone name]' or epoch seconds as a JSON number"
)


def _check_date(type_name: str, raw: str, year: int, month: int, day: int) -> None:
    if year == 0:
        raise ValueError(f"{type_name} {brief(raw)} has year 0000; years run from 0001 to 9999")
    if not 1 <= month <= 12:
        raise ValueError(f"{type_name} {brief(raw)} has month {month}; months run from 1 to 12")
    if day == 0 or day > _DAYS_IN_MONTH[month]:
        if month == 2 and day == 29:
            if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
                return
            raise ValueError(f"{type_name} {brief(raw)}: {year:04d} is not a leap year, February has 28 days")
        raise ValueError(f"{type_name} {brief(raw)}: day is out of range for {_MONTH_NAMES[month]} (1 to {_DAYS_IN_MONTH[month]})")


def _check_time(type_name: str, raw: str, h: int, mi: int, s: int) -> None:
    if h > 23:
        raise ValueError(f"{type_name} {brief(raw)} has hour {h}; hours run from 0 to 23")
    if mi > 59:
        raise ValueError(f"{type_name} {brief(raw)} has minute {mi}; minutes run from 0 to 59")
    if s > 59:
        raise ValueError(f"{type_name} {brief(raw)} has second {s}; seconds run from 0 to 59 (no leap seconds)")


def _micros(type_name: str, raw: str, frac: str | None) -> str:
    """The fraction as six digits ("" when zero or absent).

    BigQuery keeps microseconds; digits 7 to 9 (nanoseconds, as Go and Java print) are
    accepted only when zero, so nothing is truncated.
    """
    if not frac:
        return ""
    if len(frac) > 6:
        if len(frac) > 9:
            raise ValueError(f"{type_name} {brief(raw)} has {len(frac)} fraction digits; at most 9 allowed")
        if frac[6:].strip("0"):
            raise ValueError(
                f"{type_name} {brief(raw)} has sub-microsecond precision; {type_name} keeps microseconds "
                "(digits 7 to 9 of the fraction must be zero)"
            )
        frac = frac[:6]
    if frac.strip("0") == "":
        return ""
    return frac + "0" * (6 - len(frac))


def normalize_date(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a date 'YYYY-[M]M-[D]D', got {_kind(value)}")
    m = _DATE.match(value)
    if m is None:
        raise ValueError(f"expected a date 'YYYY-[M]M-[D]D', got {brief(value)}")
    y, mo, d = (int(g) for g in m.groups())
    _check_date("date", value, y, mo, d)
    return f"{y:04d}-{mo:02d}-{d:02d}"


def _time_text(type_name: str, raw: str, h: str, mi: str, s: str, frac: str | None) -> str:
    hour, minute, second = int(h), int(mi), int(s)
    _check_time(type_name, raw, hour, minute, second)
    us = _micros(type_name, raw, frac)
    text = f"{hour:02d}:{minute:02d}:{second:02d}"
    return f"{text}.{us}" if us else text


def normalize_time(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a time '[H]H:[M]M:[S]S[.ffffff]', got {_kind(value)}")
    m = _TIME.match(value)
    if m is None:
        raise ValueError(f"expected a time '[H]H:[M]M:[S]S[.ffffff]', got {brief(value)}")
    return _time_text("time", value, *m.groups())


def normalize_datetime(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a datetime 'YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.ffffff]]', got {_kind(value)}")
    m = _DATETIME.match(value)
    if m is None:
        if _TIMESTAMP.match(value) is not None or _ZONE_SUFFIX.search(value) is not None:
            raise ValueError(
                f"datetime {brief(value)} has a time zone; a datetime is zone-less civil time "
                "(drop the zone, or use type 'timestamp' for an instant)"
            )
        raise ValueError(f"expected a datetime 'YYYY-[M]M-[D]D[( |T)[H]H:[M]M:[S]S[.ffffff]]', got {brief(value)}")
    y, mo, d, h, mi, s, frac = m.groups()
    year, month, day = int(y), int(mo), int(d)
    _check_date("datetime", value, year, month, day)
    date = f"{year:04d}-{month:02d}-{day:02d}"
    if h is None:
        return f"{date}T00:00:00"
    return f"{date}T{_time_text('datetime', value, h, mi, s, frac)}"


def _utc_text(moment: datetime, us: str) -> str:
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{us}Z"
    )


def _timestamp_from_epoch(value: Any) -> str:
    text = _decimal_text(value)
    if text is None:
        raise ValueError(f"expected a timestamp {_TIMESTAMP_FORMS}, got {_kind(value)}")
    seconds = Decimal(text)
    if seconds.adjusted() > 11:  # |seconds| >= 1e12: far beyond year 9999
        raise ValueError(f"timestamp {brief(value)} (epoch seconds) is outside 0001-01-01 to 9999-12-31 in UTC")
    micros = seconds.scaleb(6, Context(prec=len(text) + 8))  # exact: enough digits for every one sent
    if micros != micros.to_integral_value():
        raise ValueError(
            f"timestamp {brief(value)} (epoch seconds) has sub-microsecond precision; "
            "timestamp keeps microseconds (at most 6 fraction digits)"
        )
    us = int(micros)
    if not _MIN_EPOCH_US <= us <= _MAX_EPOCH_US:
        raise ValueError(
            f"timestamp {brief(value)} (epoch seconds) is outside 0001-01-01 to 9999-12-31 in UTC "
            "(-62135596800 to 253402300799.999999)"
        )
    moment = _EPOCH + timedelta(microseconds=us)
    return _utc_text(moment, f"{moment.microsecond:06d}")


def _zone(raw: str, name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"timestamp {brief(raw)} has the unknown time zone {brief(name)} "
            "(use an IANA name such as 'UTC' or 'America/Los_Angeles', or an offset such as +05:30)"
        ) from None


def normalize_timestamp(value: Any) -> str:
    t = type(value)
    if t is not str:
        if t is int or t is float or t is JsonNumber:
            return _timestamp_from_epoch(value)
        raise ValueError(f"expected a timestamp {_TIMESTAMP_FORMS}, got {_kind(value)}")
    m = _TIMESTAMP.match(value)
    if m is None:
        raise ValueError(f"expected a timestamp {_TIMESTAMP_FORMS}, got {brief(value)}")
    y, _sep, mo, d, h, mi, s, frac, _z, zsign, zh, zm, zname = m.groups()
    year, month, day = int(y), int(mo), int(d)
    _check_date("timestamp", value, year, month, day)
    if h is None:
        return f"{year:04d}-{month:02d}-{day:02d}T00:00:00.000000Z"
    hour, minute, second = int(h), int(mi), int(s)
    _check_time("timestamp", value, hour, minute, second)
    us = _micros("timestamp", value, frac) or "000000"
    local = datetime(year, month, day, hour, minute, second)
    try:
        if zsign is not None:
            offset_h, offset_m = int(zh), int(zm or "0")
            if offset_h > 23 or offset_m > 59:
                raise ValueError(f"timestamp {brief(value)} has an invalid UTC offset; use -23:59 to +23:59")
            offset = timedelta(hours=offset_h, minutes=offset_m)
            utc = local - offset if zsign == "+" else local + offset
        elif zname is not None and zname.upper() != "UTC":
            # fold=0: a wall time repeated or skipped by a DST change reads with the offset
            # in force before the change, as BigQuery (absl::FromCivil) does.
            utc = local.replace(tzinfo=_zone(value, zname)).astimezone(timezone.utc).replace(tzinfo=None)
        else:
            utc = local
    except OverflowError:
        raise ValueError(f"timestamp {brief(value)} is outside 0001-01-01 to 9999-12-31 in UTC") from None
    return _utc_text(utc, us)


# --- geography --------------------------------------------------------------------

_HEX = re.compile(r"(?:0[01])(?:[0-9A-Fa-f]{2})+\Z")  # WKB starts with its byte-order byte, 00 or 01
_GEOJSON_TYPES = frozenset(
    ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection")
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg[:120]


def _geometry_from_geojson(obj: dict) -> Any:
    gtype = obj.get("type")
    if gtype in ("Feature", "FeatureCollection"):
        raise ValueError(f"expected a GeoJSON geometry, got a {gtype} (send its 'geometry' object)")
    if type(gtype) is not str or gtype not in _GEOJSON_TYPES:
        raise ValueError(
            f"GeoJSON geometry has type {brief(gtype)}; expected one of {', '.join(sorted(_GEOJSON_TYPES))}"
        )
    if gtype == "GeometryCollection":
        members = obj.get("geometries")
        if type(members) is not list:
            raise ValueError("GeoJSON GeometryCollection needs a 'geometries' list")
        for member in members:
            if type(member) is not dict:
                raise ValueError(f"GeoJSON GeometryCollection member is {brief(member)}, expected an object")
            _geometry_from_geojson(member)  # validate members' shape recursively
    elif type(obj.get("coordinates")) is not list:
        raise ValueError(f"GeoJSON {gtype} needs a 'coordinates' list")
    try:
        return _geojson_shape(obj)
    except ValueError as exc:
        raise ValueError(f"invalid GeoJSON {gtype}: {_first_line(exc)}") from None
    except Exception as exc:  # shapely raises KeyError/TypeError/GEOSException on malformed input
        raise ValueError(f"invalid GeoJSON {gtype}: coordinates are malformed ({_first_line(exc)})") from None


def normalize_geography(value: Any) -> str:
    t = type(value)
    if t is dict:
        geom = _geometry_from_geojson(value)
    elif t is str:
        text = value.strip()
        if text.startswith("{"):
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"geography string looks like GeoJSON but is not valid JSON ({_first_line(exc)})") from None
            if type(obj) is not dict:
                raise ValueError("geography GeoJSON must be an object")
            geom = _geometry_from_geojson(obj)
        elif _HEX.match(text) is not None:
            # Hex-encoded WKB, as BigQuery loads it from JSON and CSV:
            # https://cloud.google.com/bigquery/docs/geospatial-data (WKB "can be hex encoded" in JSON)
            try:
                geom = shapely.wkb.loads(text, hex=True)
            except Exception as exc:
                raise ValueError(f"geography {brief(value)} is not valid hex-encoded WKB ({_first_line(exc)})") from None
        else:
            if not text:
                raise ValueError("geography is an empty string; expected WKT such as 'POINT(1 2)' or GeoJSON")
            try:
                geom = shapely.wkt.loads(text)
            except Exception as exc:
                raise ValueError(f"geography {brief(value)} is not valid WKT ({_first_line(exc)})") from None
    else:
        raise ValueError(
            f"expected a geography as WKT text, hex-encoded WKB or a GeoJSON geometry (object or text), got {_kind(value)}"
        )

    try:
        if geom.is_empty:
            raise ValueError("geography is empty; send null for no value")
        if shapely.has_z(geom) or shapely.has_m(geom):
            raise ValueError("geography must be 2-D (longitude latitude); drop Z/M coordinates")
        coords = shapely.get_coordinates(geom)
        if not bool(((coords >= [-180.0, -90.0]) & (coords <= [180.0, 90.0])).all()):
            # NaN compares false, so it lands here too.
            raise ValueError(
                "geography coordinates must be longitude in [-180, 180] then latitude in [-90, 90] "
                f"(bounds {tuple(round(b, 6) for b in geom.bounds)})"
            )
        if not geom.is_valid:
            raise ValueError(f"geography is not valid: {shapely.is_valid_reason(geom)}")
        return geom.wkt
    except ValueError:
        raise
    except Exception as exc:  # pragma: no cover - defensive: GEOS errors on exotic input
        raise ValueError(f"geography could not be processed ({_first_line(exc)})") from None

