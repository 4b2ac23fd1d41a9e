"""Property tests for the validator and the type mapping (hypothesis).

For every one of the 13 types:

- every value the validator accepts lands in DuckDB (the real `DuckDBWarehouse`, a file in
  a temp dir) and reads back equal to what the client meant (compared as values: the
  instant of a timestamp, the number of a decimal, the geometry of a shape);
- every value sent through the API (the ASGI app with a real `LocalBroker`) gets either a
  200 or a 4xx whose details name the field (`user_activities[0].col_values[1]`), never
  a 5xx, and the API's verdict is the validator's.

Bodies go through `json.dumps` and the API's own decoder (`loads_exact`) first, so the
validator sees what it would see from the wire. The accepted forms include every
BigQuery JSON-ingestion form of each type (epoch-second and zoned timestamps, one-digit
date parts, `str(float)` non-finite floats, records as JSON text or any JSON value ...).
Example counts are bounded; the BigQuery (bqemulator) round trip runs a few examples.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from decimal import Decimal
from itertools import count
from typing import Any

import orjson
import pytest
import shapely
import shapely.wkt
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from app.api.app import create_app
from app.schema.columnar import runs_of
from app.schema.types import TYPE_NAMES
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from app.schema.values import loads_exact
from app.settings import Settings
from app.warehouse.base import Envelope
from app.warehouse.duckdb import DuckDBWarehouse

EXAMPLES = 50
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                               HealthCheck.too_slow])
LIMITS = dict(max_activities=100, max_columns=100, max_value_bytes=64 * 1024, max_record_depth=15)
UTC = dt.timezone.utc


# --------------------------------------------------------------------------- strategies
# Each yields (wire value, expected) where expected is what the value means (None when
# the value may be invalid, e.g. a random string offered as a date).

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
junk = json_values.map(lambda v: (v, None))
finite_json_values = st.recursive(  # what a JSON encoder can write (no NaN / Infinity)
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

tz_offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
ZONE_NAMES = ["UTC", "America/Los_Angeles", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe", "Pacific/Chatham"]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def _bq_timestamp_text(d: dt.datetime) -> str:
    """BigQuery's canonical form with one-digit parts where possible and a varying zone spelling."""
    frac = f".{d.microsecond:06d}".rstrip("0") if d.microsecond else ""
    return f"{d.year:04d}-{d.month}-{d.day} {d.hour}:{d.minute}:{d.second}{frac}"


def _offset_text(d: dt.datetime) -> str:
    minutes = int(d.utcoffset().total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
    return f"{sign}{minutes // 60}" + (f":{minutes % 60}" if minutes % 60 else "")


def _zoned(d: dt.datetime, zone: str):
    from zoneinfo import ZoneInfo

    local = d.replace(tzinfo=ZoneInfo(zone))  # fold=0, as BigQuery reads an ambiguous wall time
    return (_bq_timestamp_text(d) + " " + zone, local.astimezone(UTC))


def _epoch(micros: int):
    seconds = Decimal(micros).scaleb(-6)
    wire_value = int(seconds) if micros % 1_000_000 == 0 else float(seconds)
    assume(wire_value == seconds)  # the float written must be the instant (json.dumps writes repr)
    return (wire_value, EPOCH + dt.timedelta(microseconds=micros))


def _decimal_text(max_int: int, max_frac: int):
    return st.tuples(
        st.booleans(), st.text("0123456789", min_size=1, max_size=max_int), st.text("0123456789", max_size=max_frac)
    ).map(lambda t: ("-" if t[0] else "") + t[1] + ("." + t[2] if t[2] else "")).map(lambda s: (s, Decimal(s)))


def _geo():
    lon = st.floats(-180, 180, allow_nan=False, allow_subnormal=False)
    lat = st.floats(-90, 90, allow_nan=False, allow_subnormal=False)
    point_wkt = st.tuples(lon, lat).map(lambda p: (f"POINT({p[0]!r} {p[1]!r})", shapely.Point(p)))
    point_geojson = st.tuples(lon, lat).map(lambda p: ({"type": "Point", "coordinates": [p[0], p[1]]}, shapely.Point(p)))
    line = st.lists(st.tuples(lon, lat), min_size=2, max_size=5, unique=True).map(
        lambda pts: ("LINESTRING(" + ", ".join(f"{x!r} {y!r}" for x, y in pts) + ")", shapely.LineString(pts))
    )
    box = st.tuples(st.floats(-170, 170), st.floats(-80, 80), st.floats(0.001, 5), st.floats(0.001, 5)).map(
        lambda b: (shapely.box(b[0], b[1], b[0] + b[2], b[1] + b[3]).wkt, shapely.box(b[0], b[1], b[0] + b[2], b[1] + b[3]))
    )
    return point_wkt | point_geojson | line | box


VALID: dict[str, Any] = {
    "string": st.text(max_size=200).map(lambda s: (s, s)),
    "bytes": st.binary(max_size=200).map(lambda b: (base64.b64encode(b).decode(), b)),
    "integer": st.integers(-(2**63), 2**63 - 1).flatmap(lambda n: st.sampled_from([(n, n), (str(n), n)]))
    | st.integers(-(2**53), 2**53).map(lambda n: (float(n), n)),  # 2.0, 1e3: numbers by value
    "float": st.floats(allow_nan=False, allow_infinity=False).map(lambda f: (f, f))
    | st.floats(allow_nan=False, allow_infinity=False).map(lambda f: (str(f), f))
    | st.sampled_from(
        [("NaN", "NaN"), ("Infinity", math.inf), ("-Infinity", -math.inf), ("nan", "NaN"), ("inf", math.inf),
         ("-inf", -math.inf), ("+INF", math.inf), ("-Infinity", -math.inf)]
    ),
    "numeric": _decimal_text(29, 9),
    "bignumeric": _decimal_text(38, 38),
    "boolean": st.booleans().map(lambda b: (b, b)) | st.sampled_from([("true", True), ("FALSE", False), ("True", True)]),
    "timestamp": st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=tz_offsets).flatmap(
        lambda d: st.sampled_from([(d.isoformat(), d), (d.isoformat(sep=" "), d)])
    )
    | st.datetimes(min_value=dt.datetime(1, 1, 2)).map(lambda d: (d.isoformat(), d.replace(tzinfo=UTC)))
    | st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9998, 12, 31)).flatmap(
        lambda d: st.sampled_from([_bq_timestamp_text(d) + " UTC", _bq_timestamp_text(d) + "Z"]).map(
            lambda text: (text, d.replace(tzinfo=UTC))
        )
    )
    | st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=tz_offsets).map(
        lambda d: (_bq_timestamp_text(d) + _offset_text(d), d)
    )
    | st.tuples(st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31)), st.sampled_from(ZONE_NAMES)).map(
        lambda t: _zoned(*t)
    )
    | st.integers(-62135596800 * 10**6, 253402300799 * 10**6 + 999999).map(_epoch)
    | st.dates().map(lambda d: (d.isoformat(), dt.datetime(d.year, d.month, d.day, tzinfo=UTC))),
    "date": st.dates().flatmap(lambda d: st.sampled_from([(d.isoformat(), d), (f"{d.year:04d}-{d.month}-{d.day}", d)])),
    "time": st.times().flatmap(
        lambda t: st.sampled_from([(t.isoformat(), t), (f"{t.hour}:{t.minute}:{t.second}" + (f".{t.microsecond:06d}" if t.microsecond else ""), t)])
    ),
    "datetime": st.datetimes().flatmap(
        lambda d: st.sampled_from([(d.isoformat(), d), (d.isoformat(sep=" "), d), (_bq_timestamp_text(d), d)])
    )
    | st.dates().map(lambda d: (d.isoformat(), dt.datetime(d.year, d.month, d.day))),
    "geography": _geo(),
    # any JSON value but null and a bare string, as itself or as JSON text (json.dumps, what
    # the official client sends); integers up to UINT64 and floats are kept exactly
    "record": (st.dictionaries(st.text(max_size=10), finite_json_values, max_size=5)
               | st.lists(finite_json_values, max_size=4)
               | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans())
    .flatmap(lambda d: st.sampled_from([(d, d), (json.dumps(d), d)])),
}
# Near misses per type: values of the wrong shape that must be refused or parsed right.
NEAR: dict[str, Any] = {
    "string": st.integers() | st.booleans() | st.floats(),
    "bytes": st.text(max_size=30),
    "integer": st.floats() | st.text("0123456789+-. e", max_size=25) | st.integers(),
    "float": st.text("0123456789+-.eEnaINfity", max_size=20),
    "numeric": st.text("0123456789+-.eE", max_size=45) | st.floats(),
    "bignumeric": st.text("0123456789+-.eE", max_size=80),
    "boolean": st.text(max_size=6) | st.integers(0, 1),
    "timestamp": st.text("0123456789-:TZ .+", max_size=35),
    "date": st.text("0123456789-", max_size=12),
    "time": st.text("0123456789:.", max_size=18),
    "datetime": st.text("0123456789-:T .Z", max_size=30),
    "geography": st.text(max_size=40) | st.dictionaries(st.sampled_from(["type", "coordinates"]), json_values, max_size=2),
    "record": json_values,
}


def wire_text(value: Any) -> str:
    """The value as a client's JSON encoder writes it (Python's json: floats as repr)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        assume(False)  # NaN / Infinity floats are not JSON


def wire(value: Any) -> Any:
    """The value as the API decodes it from JSON."""
    return loads_exact(wire_text(value))


def body_for(typ: str, value: Any, table: str = "props", row_id: int = 0) -> dict:
    return {"user_activities": [{"operation": "insert", "table": table, "col_names": ["id", "v"],
                                 "col_types": ["integer", typ], "col_values": [row_id, value]}]}


def validator_accepts(body: dict):
    try:
        return validate_batch(body, **LIMITS)
    except (BatchInvalid, LimitExceeded):
        return None


# --------------------------------------------------------------------------- comparison


def same(typ: str, expected: Any, got: Any) -> bool:
    if typ == "float":
        if expected == "NaN":
            return isinstance(got, float) and math.isnan(got)
        return got == expected
    if typ in ("numeric", "bignumeric"):
        return Decimal(str(got)) == expected
    if typ == "bytes":
        return bytes(got) == expected
    if typ == "timestamp":
        return got.tzinfo is not None and got == expected  # aware datetimes compare as instants
    if typ == "datetime":
        return got.tzinfo is None and got == expected
    if typ == "geography":
        return shapely.wkt.loads(got).equals_exact(expected, tolerance=1e-9)
    if typ == "record":
        return json.loads(got) == expected
    return got == expected and type(got) is type(expected)


READ_EXPR = {"geography": "ST_AsText(v)", "record": "CAST(v AS VARCHAR)"}


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    wh = DuckDBWarehouse(Settings(data_dir=tmp_path_factory.mktemp("props")))
    yield wh
    wh.close()


_ids = count()


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_every_accepted_value_lands_in_duckdb_and_reads_back_equal(typ, warehouse):
    assert warehouse.capabilities.supports_geometry  # the pinned spatial wheel is loaded
    table = f"prop_{typ}"

    @PROPS
    @given(VALID[typ])
    def check(pair):
        raw, expected = pair
        row_id = next(_ids)
        body = wire(body_for(typ, raw, table, row_id))
        activities = validator_accepts(body)
        assert activities is not None, f"valid {typ} value refused: {raw!r}"
        # as a v2 message carries them (columnar runs); v1 and v2 apply alike (tests/warehouse)
        result = warehouse.apply(table, [Envelope(f"prop:{row_id}", table, runs=runs_of(activities))])
        assert result.rows_inserted == 1 and not result.rejections, result
        _, rows = warehouse.query(f"SELECT {READ_EXPR.get(typ, 'v')} FROM {table} WHERE id = ?", [row_id])
        assert len(rows) == 1
        assert same(typ, expected, rows[0][0]), f"{typ}: sent {raw!r}, meant {expected!r}, read back {rows[0][0]!r}"

    check()


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_near_misses_that_are_accepted_also_land(typ, warehouse):
    """Whatever odd input the validator lets through must apply (never a poison message)."""
    table = f"near_{typ}"

    @PROPS
    @given(NEAR[typ] | junk.map(lambda p: p[0]))
    def check(raw):
        row_id = next(_ids)
        activities = validator_accepts(wire(body_for(typ, raw, table, row_id)))
        if activities is None:
            return
        result = warehouse.apply(table, [Envelope(f"near:{row_id}", table, runs=runs_of(activities))])
        assert result.rows_inserted == 1 and not result.rejections, (raw, result)

    check()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    s = Settings(data_dir=tmp_path_factory.mktemp("api"), **LIMITS)
    with TestClient(create_app(s)) as c:
        yield c


@pytest.mark.parametrize("typ", TYPE_NAMES)
def test_api_answers_200_or_a_4xx_naming_the_field(typ, client):
    @PROPS
    @given(VALID[typ].map(lambda p: p[0]) | NEAR[typ] | junk.map(lambda p: p[0]))
    def check(raw):
        text = wire_text(body_for(typ, raw))
        body = loads_exact(text)
        r = client.post("/api-log/v1/", content=text, headers={"content-type": "application/json"})
        accepted = validator_accepts(body) is not None
        if accepted:
            assert r.status_code == 200, (raw, r.text)
            return
        assert r.status_code in (413, 422), (raw, r.status_code, r.text)
        payload = r.json()
        assert payload["error"] is True
        if r.status_code == 422:
            assert [d["loc"] for d in payload["details"]] == ["user_activities[0].col_values[1]"], payload
        else:
            assert "user_activities[0].col_values[1]" in payload["message"] or payload["message"], payload

    check()


identifier = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=40) | st.from_regex(
    r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z"
)


@PROPS
@given(table=identifier, column=identifier)
def test_identifiers_are_accepted_or_refused_with_their_field(client, table, column):
    body = {"user_activities": [{"operation": "insert", "table": table, "col_names": ["id", column],
                                 "col_types": ["integer", "string"], "col_values": [1, "x"]}]}
    r = client.post("/api-log/v1/", content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        locs = {d["loc"] for d in r.json()["details"]}
        assert locs <= {"user_activities[0].table", "user_activities[0].col_names[1]"} and locs, locs
    else:
        import re

        for name in (table, column):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)


# --------------------------------------------------------------------------- BigQuery round trip

# bqemulator cannot create BIGNUMERIC columns (tests/support/bqemulator.py); the other 12
# types go over the wire to the emulator in one row per example.
BQ_TYPES = [t for t in TYPE_NAMES if t != "bignumeric"]
BQ_EXAMPLES = 6


@pytest.fixture(scope="module")
def bigquery(tmp_path_factory):
    from tests.warehouse.conftest import BACKENDS  # skips, or fails with CI=true, without the emulator

    backend = BACKENDS["bigquery"](tmp_path_factory.mktemp("bq"))
    yield backend
    backend.close()


def _same_on_bigquery(typ: str, expected: Any, got: Any) -> bool:
    """`got` is normalized by tests.warehouse.conftest.normalize_value."""
    if typ == "float":
        return got == ("NaN" if expected == "NaN" else expected)
    if typ == "geography":
        a, b = shapely.normalize(shapely.wkt.loads(got)), shapely.normalize(expected)
        return a.equals_exact(b, tolerance=1e-6) or a.equals(b)
    if typ == "timestamp":
        return got == expected
    return got == expected


def test_every_accepted_value_reads_back_equal_on_bigquery(bigquery):
    table = "prop_all_" + str(next(_ids))
    columns = [("id", "integer")] + [(f"c_{t}", t) for t in BQ_TYPES]

    @settings(max_examples=BQ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({t: VALID[t] for t in BQ_TYPES}))
    def check(row):
        row_id = next(_ids)
        text = wire_text({"user_activities": [{"operation": "insert", "table": table,
                                               "col_names": [n for n, _ in columns], "col_types": [t for _, t in columns],
                                               "col_values": [row_id] + [row[t][0] for t in BQ_TYPES]}]})
        activities = validator_accepts(loads_exact(text))
        assert activities is not None, f"valid row refused: {text}"
        result = bigquery.warehouse.apply(table, [Envelope(f"bq:{row_id}", table, runs=runs_of(activities))])
        assert result.rows_inserted == 1 and not result.rejections, result
        read = {r[0]: r for r in bigquery.read_rows(table, columns)}[row_id]
        for (_, typ), got in zip(columns[1:], read[1:]):
            expected = row[typ][1]
            assert _same_on_bigquery(typ, expected, got), f"{typ}: sent {row[typ][0]!r}, meant {expected!r}, read back {got!r}"

    check()


# --------------------------------------------------------------------------- exact numbers end to end

EXACT_BODY = (
    b'{"user_activities": [{"operation": "insert", "table": "exact", "col_names": ["id", "n", "r", "ts", "i"],'
    b' "col_types": ["integer", "numeric", "record", "timestamp", "integer"], "col_values": [1,'
    b' 12345678901234567890.123456789, {"u": 18446744073709551615, "f": 0.30000000000000004, "l": [1, -2]},'
    b' 1617084764.5, 9223372036854775807.0]}]}'
)


def test_numbers_from_the_wire_land_exactly(warehouse):
    activities = validator_accepts(loads_exact(EXACT_BODY))
    assert activities is not None
    result = warehouse.apply("exact", [Envelope("exact:1", "exact", activities)])
    assert result.rows_inserted == 1, result
    _, rows = warehouse.query("SELECT CAST(n AS VARCHAR), CAST(r AS VARCHAR), ts, i FROM exact")
    n, r, ts, i = rows[0]
    assert Decimal(n) == Decimal("12345678901234567890.123456789")
    assert json.loads(r) == {"u": 18446744073709551615, "f": 0.30000000000000004, "l": [1, -2]}
    assert ts == dt.datetime(2021, 3, 30, 6, 12, 44, 500000, tzinfo=UTC)
    assert i == 9223372036854775807


@pytest.mark.parametrize(
    "record, fragment",
    [
        (b'{"a": 12345678901234567890123}', "12345678901234567890123 is outside the range"),
        (b'{"a": 1.10000000000000000000035}', "1.10000000000000000000035 has more digits"),
        (b'"{\\"a\\": 12345678901234567890123}"', "12345678901234567890123 is outside the range"),  # as JSON text
    ],
)
def test_api_refuses_a_record_number_it_cannot_keep(client, record, fragment):
    body = (
        b'{"user_activities": [{"operation": "insert", "table": "t", "col_names": ["r"], "col_types": ["record"],'
        b' "col_values": [' + record + b"]}]}"
    )
    r = client.post("/api-log/v1/", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    [detail] = r.json()["details"]
    assert detail["loc"] == "user_activities[0].col_values[0]" and fragment in detail["message"], detail


@pytest.mark.parametrize(
    "value, status, fragment",
    [
        (b"-9223372036854775809", 422, "out of INT64 range"),
        (b"9223372036854775808.0", 422, "out of INT64 range"),
        (b"1.5", 422, "which has a fraction"),
        (b"1e3", 200, None),
        (b"9223372036854775807.0", 200, None),
    ],
)
def test_api_integer_verdicts_name_the_problem(client, value, status, fragment):
    body = (
        b'{"user_activities": [{"operation": "insert", "table": "t", "col_names": ["i"], "col_types": ["integer"],'
        b' "col_values": [' + value + b"]}]}"
    )
    r = client.post("/api-log/v1/", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if fragment is not None:
        [detail] = r.json()["details"]
        assert fragment in detail["message"] and "decimal point" not in detail["message"], detail
