"""Per-type value validation and normalization, one normalizer per activity column type.

Every `normalize_<type>(value)` takes a JSON-decoded value that is not `None` (the caller
handles null) and returns the canonical value listed in `app.schema.types`, or raises
`ValueError` whose message says what was wrong and what to send instead. The
normalizers never raise anything else, never mutate their input and are deterministic:
normalizing a canonical value returns it unchanged.

What each type accepts (decisions documented here, tests in tests/schema/test_values.py):

- string: a JSON string only (numbers and booleans are refused, not stringified). Lone
  UTF-16 surrogates are refused (BigQuery needs valid UTF-8).
- bytes: a standard-alphabet base64 string with correct padding (strict: no whitespace,
  no URL-safe alphabet). Canonical: the bytes re-encoded as standard padded base64.
- integer: a JSON integer, or a string of ASCII digits with an optional sign ("42",
  "+7", "-9223372036854775808"), within INT64. Refused: booleans, every float (also 2.0:
  JSON `2.0` is a float literal; write `2`), strings with a point, an exponent or
  whitespace. orjson decodes integers beyond 64 bits as floats, so they are reported as
  out of range.
- float: a JSON number (not a boolean), the exact strings "NaN", "Infinity", "-Infinity"
  (spelled as BigQuery does; "nan", "inf" are refused), or a plain decimal string such as
  "1.5" or "-2e10". Canonical: a Python float, or one of the three strings for
  non-finite values (JSON cannot carry them).
- numeric / bignumeric: an exact decimal, from a JSON integer, a decimal string
  ("1.50", "-3e2", ".5") or a JSON float. A float is converted through `repr(float)`,
  the shortest text that round-trips, which equals the JSON text the client sent for
  any number with at most 15 significant digits; numbers with more digits must be sent
  as strings to stay exact (the JSON decoder has already rounded them to a double).
  Limits: numeric 29 integer and 9 fraction digits, bignumeric 38 and 38; more fraction
  digits are refused, not rounded. NaN/Infinity are refused. Canonical: plain decimal
  text, no exponent, no leading zeros, no trailing fraction zeros, "-0" -> "0".
- boolean: a JSON boolean, or the strings "true"/"false" in any letter case. Numbers
  (0/1) are refused.
- timestamp: "YYYY-MM-DD[T| ]HH:MM:SS[.f{1,9}][Z|±HH:MM]" ("t"/"z" also accepted), no zone
  means UTC; years 0001-9999 after conversion to UTC. Fraction digits beyond the
  sixth must be zero (BigQuery keeps microseconds): non-zero nanoseconds are refused,
  not truncated. Seconds 60 (leap second) is refused. Canonical:
  "YYYY-MM-DDTHH:MM:SS.ffffffZ" in UTC, always six fraction digits.
- date: exactly "YYYY-MM-DD", year 0001-9999, calendar-checked (leap days).
- time: "HH:MM:SS[.f{1,6}]". Canonical as `datetime.time.isoformat()`: "HH:MM:SS" when
  the fraction is zero, else "HH:MM:SS.ffffff" (six digits).
- datetime: "YYYY-MM-DD[T| ]HH:MM:SS[.f{1,6}]" without a zone (a zone suffix is refused,
  suggesting type timestamp). Canonical like `datetime.isoformat()`: "T" separator, the
  fraction only when non-zero, six digits.
- geography: WKT text, a GeoJSON geometry object, or a string holding a GeoJSON geometry
  object. Must be non-empty, 2-D (no Z/M), with longitude in [-180, 180] and latitude in
  [-90, 90], and valid (no self-intersections, closed rings ...). Canonical: shapely's WKT.
- record: a JSON object. Canonical: the dict itself (depth and size are limits checked
  by `app.schema.validation`).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timedelta
from typing import Any

import orjson
import shapely
import shapely.wkt
from shapely.geometry import shape as _geojson_shape

__all__ = [
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

_BRIEF_CHARS = 50


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
    if t is float:
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


def normalize_record(value: Any) -> dict:
    if type(value) is not dict:
        raise ValueError(f"expected a JSON object for record, got {_kind(value)}")
    return value


# --- integer / float / boolean ----------------------------------------------------

_INT_STR = re.compile(r"([+-]?)0*([0-9]+)\Z")


def normalize_integer(value: Any) -> int:
    t = type(value)
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise ValueError(f"integer out of INT64 range (-9223372036854775808 to 9223372036854775807): {brief(value)}")
    if t is str:
        m = _INT_STR.match(value)
        if m is None:
            raise ValueError(f"expected an integer, got the string {brief(value)} (only digits with an optional sign)")
        digits = m.group(2)
        if len(digits) > 19:
            raise ValueError(f"integer out of INT64 range (-9223372036854775808 to 9223372036854775807): {brief(value)}")
        n = int(digits)
        if m.group(1) == "-":
            n = -n
        if INT64_MIN <= n <= INT64_MAX:
            return n
        raise ValueError(f"integer out of INT64 range (-9223372036854775808 to 9223372036854775807): {brief(value)}")
    if t is float:
        if value.is_integer():
            if -9.3e18 < value < 9.3e18 and INT64_MIN <= int(value) <= INT64_MAX:
                raise ValueError(f"expected an integer, got the number {value!r} (write it without a decimal point)")
            raise ValueError(f"integer out of INT64 range (-9223372036854775808 to 9223372036854775807): {value!r}")
        raise ValueError(f"expected an integer, got the number {brief(value)}")
    raise ValueError(f"expected an integer, got {_kind(value)}")


_FLOAT_SPECIAL: dict[str, str] = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}
_DECIMAL_STR = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?\Z")


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
            raise ValueError(f"number out of FLOAT64 range: {brief(value)}") from None
    if t is str:
        special = _FLOAT_SPECIAL.get(value)
        if special is not None:
            return special
        m = _DECIMAL_STR.match(value)
        if m is None or not (m.group(2) or m.group(3)):
            raise ValueError(
                f"expected a number, got the string {brief(value)} "
                "(use a JSON number, a decimal string, or exactly 'NaN', 'Infinity', '-Infinity')"
            )
        f = float(value)
        if f - f != 0.0:
            raise ValueError(f"number out of FLOAT64 range: {brief(value)}")
        return f
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
    raise ValueError(f"expected a boolean (true or false), got {_kind(value)}")


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
        text = repr(value)
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
            raise ValueError(f"{type_name} out of range: {brief(value)}")
        point += -int(exp_digits or "0") if ex[0] == "-" else int(exp_digits or "0")
    digits = stripped.rstrip("0")
    n_int = point if point > 0 else 0
    n_frac = len(digits) - point if len(digits) > point else 0
    if n_int > max_int:
        raise ValueError(f"{type_name} allows at most {max_int} integer digits, got {n_int} in {brief(value)}")
    if n_frac > max_frac:
        raise ValueError(
            f"{type_name} allows at most {max_frac} fraction digits, got {n_frac} in {brief(value)} (round it first)"
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

_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_NAMES = (
    "", "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})\Z")
_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?\Z")
_DATETIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?\Z")
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?\Z"
)
_ZONE_SUFFIX = re.compile(r"[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?\s*(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?|UTC)\Z")


def _check_date(type_name: str, raw: str, y: str, mo: str, d: str) -> None:
    year, month, day = int(y), int(mo), int(d)
    if year == 0:
        raise ValueError(f"{type_name} {brief(raw)} has year 0000; years run from 0001 to 9999")
    if not 1 <= month <= 12:
        raise ValueError(f"{type_name} {brief(raw)} has month {mo}; months run from 01 to 12")
    if day == 0 or day > _DAYS_IN_MONTH[month]:
        if month == 2 and day == 29:
            if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
                return
            raise ValueError(f"{type_name} {brief(raw)}: {year:04d} is not a leap year, February has 28 days")
        raise ValueError(f"{type_name} {brief(raw)}: day is out of range for {_MONTH_NAMES[month]} (1 to {_DAYS_IN_MONTH[month]})")


def _check_time(type_name: str, raw: str, h: str, mi: str, s: str) -> None:
    if h > "23":
        raise ValueError(f"{type_name} {brief(raw)} has hour {h}; hours run from 00 to 23")
    if mi > "59":
        raise ValueError(f"{type_name} {brief(raw)} has minute {mi}; minutes run from 00 to 59")
    if s > "59":
        raise ValueError(f"{type_name} {brief(raw)} has second {s}; seconds run from 00 to 59 (no leap seconds)")


def _micros(type_name: str, raw: str, frac: str | None, max_digits: int) -> str:
    """The fraction as six digits ("" when zero or absent)."""
    if not frac:
        return ""
    if len(frac) > 6:
        if len(frac) > max_digits:
            raise ValueError(f"{type_name} {brief(raw)} has {len(frac)} fraction digits; at most {max_digits} allowed")
        if frac[6:].strip("0"):
            raise ValueError(
                f"{type_name} {brief(raw)} has sub-microsecond precision; at most 6 non-zero fraction digits are kept"
            )
        frac = frac[:6]
    if frac.strip("0") == "":
        return ""
    return frac + "0" * (6 - len(frac))


def normalize_date(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a date 'YYYY-MM-DD', got {_kind(value)}")
    m = _DATE.match(value)
    if m is None:
        raise ValueError(f"expected a date 'YYYY-MM-DD', got {brief(value)}")
    _check_date("date", value, *m.groups())
    return value


def normalize_time(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a time 'HH:MM:SS[.ffffff]', got {_kind(value)}")
    m = _TIME.match(value)
    if m is None:
        raise ValueError(f"expected a time 'HH:MM:SS[.ffffff]', got {brief(value)}")
    h, mi, s, frac = m.groups()
    _check_time("time", value, h, mi, s)
    us = _micros("time", value, frac, 6)
    return f"{h}:{mi}:{s}.{us}" if us else f"{h}:{mi}:{s}"


def normalize_datetime(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a datetime 'YYYY-MM-DD HH:MM:SS[.ffffff]', got {_kind(value)}")
    m = _DATETIME.match(value)
    if m is None:
        if _TIMESTAMP.match(value) is not None or _ZONE_SUFFIX.search(value) is not None:
            raise ValueError(
                f"datetime {brief(value)} has a time zone; a datetime is zone-less civil time "
                "(drop the zone, or use type 'timestamp' for an instant)"
            )
        raise ValueError(f"expected a datetime 'YYYY-MM-DD HH:MM:SS[.ffffff]', got {brief(value)}")
    y, mo, d, h, mi, s, frac = m.groups()
    _check_date("datetime", value, y, mo, d)
    _check_time("datetime", value, h, mi, s)
    us = _micros("datetime", value, frac, 6)
    return f"{y}-{mo}-{d}T{h}:{mi}:{s}.{us}" if us else f"{y}-{mo}-{d}T{h}:{mi}:{s}"


def normalize_timestamp(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a timestamp 'YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM]', got {_kind(value)}")
    m = _TIMESTAMP.match(value)
    if m is None:
        raise ValueError(f"expected a timestamp 'YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM]', got {brief(value)}")
    y, mo, d, h, mi, s, frac, _z, zsign, zh, zm = m.groups()
    _check_date("timestamp", value, y, mo, d)
    _check_time("timestamp", value, h, mi, s)
    us = _micros("timestamp", value, frac, 9) or "000000"
    if zsign is None or (zh == "00" and zm == "00"):
        return f"{y}-{mo}-{d}T{h}:{mi}:{s}.{us}Z"
    if zh > "23" or zm > "59":
        raise ValueError(f"timestamp {brief(value)} has an invalid UTC offset; use -23:59 to +23:59")
    offset = timedelta(hours=int(zh), minutes=int(zm))
    try:
        local = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))
        utc = local - offset if zsign == "+" else local + offset
    except OverflowError:
        raise ValueError(f"timestamp {brief(value)} is outside 0001-01-01 to 9999-12-31 in UTC") from None
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{us}Z"


# --- geography --------------------------------------------------------------------

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
        else:
            if not text:
                raise ValueError("geography is an empty string; expected WKT such as 'POINT(1 2)' or GeoJSON")
            try:
                geom = shapely.wkt.loads(text)
            except Exception as exc:
                raise ValueError(f"geography {brief(value)} is not valid WKT ({_first_line(exc)})") from None
    else:
        raise ValueError(f"expected a geography as WKT text or a GeoJSON geometry object, got {_kind(value)}")

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

