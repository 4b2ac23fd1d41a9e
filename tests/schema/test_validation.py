"""Batch validation: canonical activities, every problem with its exact loc, limits, fuzz."""

from __future__ import annotations

import json

import copy
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.schema.activity import Activity
from app.schema.types import TYPE_NAMES
from app.api.models import EXAMPLE_ACTIVITY, EXAMPLE_REQUEST
from app.schema.validation import MAX_DETAILS, BatchInvalid, LimitExceeded, validate_batch


def activity(**overrides):
    a = copy.deepcopy(EXAMPLE_ACTIVITY)
    a.update(overrides)
    return a


def body(*activities):
    return {"user_activities": list(activities)}


def validate(b, **limits):
    limits.setdefault("max_activities", 10_000)
    return validate_batch(b, **limits)


def problems(b, **limits):
    with pytest.raises(BatchInvalid) as info:
        validate(b, **limits)
    details = info.value.details
    assert details and all(set(d) == {"loc", "message"} for d in details)
    return details


def locs(b, **limits):
    return [d["loc"] for d in problems(b, **limits)]


# --- valid input ---


def test_readme_example():
    [a] = validate(copy.deepcopy(EXAMPLE_REQUEST))
    assert a == Activity(
        operation="insert",
        table="user_activities_table",
        col_names=["user_id", "event_type_id", "detail", "occured_at"],
        col_types=["integer", "integer", "string", "datetime"],
        col_values=[1, 2, "logged in", "2021-03-30T06:12:44"],
    )


def test_repeated_activities_use_fast_path_and_stay_independent():
    b = body(*[activity(col_values=[i, 2, f"d{i}", "2021-03-30 06:12:44"]) for i in range(50)])
    out = validate(b)
    assert [a.col_values[0] for a in out] == list(range(50))
    out[0].col_types.append("x")
    out[0].col_names.append("x")
    assert out[1].col_types == ["integer", "integer", "string", "datetime"]
    again = validate(b)
    assert again[0].col_types == ["integer", "integer", "string", "datetime"]
    assert b["user_activities"][0]["col_names"] == ["user_id", "event_type_id", "detail", "occured_at"]


def test_types_and_operation_lower_cased_names_kept():
    [a] = validate(body(activity(operation="INSERT", col_names=["User_Id"], col_types=["INTEGER"], col_values=["7"])))
    assert (a.operation, a.col_names, a.col_types, a.col_values) == ("insert", ["User_Id"], ["integer"], [7])


def test_delete():
    [a] = validate(body(activity(operation="Delete", col_names=["user_id"], col_types=["integer"], col_values=[1])))
    assert a.operation == "delete" and a.col_values == [1]


def test_null_allowed_for_every_type():
    names = [f"c_{t}" for t in TYPE_NAMES]
    [a] = validate(body(activity(col_names=names, col_types=list(TYPE_NAMES), col_values=[None] * len(names))))
    assert a.col_values == [None] * len(TYPE_NAMES)


def test_every_type_normalized():
    values = {
        "string": "s",
        "bytes": "QR==",
        "integer": "42",
        "float": "NaN",
        "numeric": "1.50",
        "bignumeric": "-0",
        "boolean": "TRUE",
        "timestamp": "2021-03-30T06:12:44+05:30",
        "date": "2024-02-29",
        "time": "06:12:44.5",
        "datetime": "2021-03-30 06:12:44.000",
        "geography": {"type": "Point", "coordinates": [1, 2]},
        "record": {"a": [1, {"b": None}]},
    }
    [a] = validate(
        body(activity(col_names=[f"c_{t}" for t in values], col_types=list(values), col_values=list(values.values())))
    )
    assert a.col_values == [
        "s",
        "QQ==",
        42,
        "NaN",
        "1.5",
        "0",
        True,
        "2021-03-30T00:42:44.000000Z",
        "2024-02-29",
        "06:12:44.500000",
        "2021-03-30T06:12:44",
        "POINT (1 2)",
        {"a": [1, {"b": None}]},
    ]


# --- body shape ---


@pytest.mark.parametrize("b", [None, [], "x", 1, True, [EXAMPLE_REQUEST]])
def test_body_not_object(b):
    assert locs(b) == ["body"]


def test_body_missing_key():
    details = problems({})
    assert details == [
        {"loc": "user_activities", "message": "missing: the body must have the key 'user_activities' (a list of activities)"}
    ]


def test_body_unknown_key_and_missing():
    assert locs({"activities": []}) == ["body", "user_activities"]


def test_body_unknown_key_with_valid_list():
    b = copy.deepcopy(EXAMPLE_REQUEST)
    b["extra"] = 1
    assert problems(b) == [{"loc": "body", "message": "unknown key 'extra'; the body has only the key 'user_activities'"}]


@pytest.mark.parametrize("ua", [None, {}, "x", 1, {"0": EXAMPLE_ACTIVITY}])
def test_user_activities_not_list(ua):
    assert locs({"user_activities": ua}) == ["user_activities"]


def test_user_activities_empty():
    assert problems({"user_activities": []}) == [
        {"loc": "user_activities", "message": "at least one activity is required"}
    ]


# --- activity shape ---


@pytest.mark.parametrize("a", [None, [], "insert", 3, [EXAMPLE_ACTIVITY]])
def test_activity_not_object(a):
    assert locs(body(activity(), a)) == ["user_activities[1]"]


def test_unknown_and_missing_keys():
    a = activity(extra=1)
    del a["col_types"]
    details = problems(body(activity(), activity(), a))
    assert [d["loc"] for d in details] == ["user_activities[2]", "user_activities[2].col_types"]
    assert "unknown key 'extra'" in details[0]["message"]
    assert details[1]["message"] == "missing"


def test_all_keys_missing():
    assert locs(body({})) == [f"user_activities[0].{f}" for f in ("operation", "table", "col_names", "col_types", "col_values")]


@pytest.mark.parametrize("op", ["merge", "", None, 1, ["insert"], "insert "])
def test_bad_operation(op):
    assert locs(body(activity(operation=op))) == ["user_activities[0].operation"]


@pytest.mark.parametrize("table", ["", "1table", "my-table", "tab\u0435", None, 5, "_ingest_state", "a" * 1025])
def test_bad_table(table):
    assert locs(body(activity(table=table))) == ["user_activities[0].table"]


@pytest.mark.parametrize("field", ["col_names", "col_types", "col_values"])
@pytest.mark.parametrize("value", [None, "abc", {"a": 1}, 3])
def test_column_lists_not_lists(field, value):
    details = problems(body(activity(**{field: value})))
    assert [d["loc"] for d in details] == [f"user_activities[0].{field}"]
    assert details[0]["message"].startswith("expected a list")


def test_unequal_lengths():
    details = problems(body(activity(col_values=[1, 2, "x"])))
    assert details == [
        {
            "loc": "user_activities[0]",
            "message": "col_names, col_types and col_values must have the same length; got 4, 4 and 3",
        }
    ]


def test_unequal_lengths_still_checks_values_pairwise():
    assert locs(body(activity(col_values=["x", 2, "y"]))) == ["user_activities[0]", "user_activities[0].col_values[0]"]


def test_empty_columns_insert():
    assert problems(body(activity(col_names=[], col_types=[], col_values=[]))) == [
        {"loc": "user_activities[0].col_names", "message": "at least one column is required"}
    ]


def test_delete_without_columns():
    details = problems(body(activity(operation="delete", col_names=[], col_types=[], col_values=[])))
    assert [d["loc"] for d in details] == ["user_activities[0].col_names"]
    assert "a delete must name at least one column" in details[0]["message"]


def test_duplicate_column_names_case_insensitive():
    details = problems(
        body(activity(col_names=["user_id", "event", "USER_ID", "User_Id"], col_types=["integer"] * 4, col_values=[1] * 4))
    )
    assert [d["loc"] for d in details] == ["user_activities[0].col_names[2]", "user_activities[0].col_names[3]"]
    assert "duplicate column name 'USER_ID'" in details[0]["message"]
    assert "col_names[0] 'user_id'" in details[0]["message"]


def test_bad_column_names():
    details = problems(
        body(activity(col_names=["ok", "1x", "_TABLE_SUFFIX", 7], col_types=["integer"] * 4, col_values=[1] * 4))
    )
    assert [d["loc"] for d in details] == [
        "user_activities[0].col_names[1]",
        "user_activities[0].col_names[2]",
        "user_activities[0].col_names[3]",
    ]


def test_unknown_types():
    details = problems(body(activity(col_types=["integer", "int", "string", 5])))
    assert [d["loc"] for d in details] == ["user_activities[0].col_types[1]", "user_activities[0].col_types[3]"]
    assert details[0]["message"].startswith("unknown column type 'int'; expected one of string, bytes, integer")


def test_value_errors_have_exact_locs():
    b = body(
        activity(),
        activity(col_values=[1.5, 2, 3, "2021-02-30 00:00:00"]),
        activity(),
        activity(col_values=[True, None, None, None]),
    )
    details = problems(b)
    assert [d["loc"] for d in details] == [
        "user_activities[1].col_values[0]",
        "user_activities[1].col_values[2]",
        "user_activities[1].col_values[3]",
        "user_activities[3].col_values[0]",
    ]
    assert details[1]["message"] == "expected a string, got the integer 3 (quote it to send it as text)"
    assert "day is out of range for February" in details[2]["message"]


def test_errors_after_fast_path_use_slow_path_locs():
    # the column set is known-valid (cached) but one value is bad
    validate(copy.deepcopy(EXAMPLE_REQUEST))
    assert locs(body(activity(), activity(col_values=[1, "x", "y", None]))) == ["user_activities[1].col_values[1]"]


def test_every_problem_reported_together():
    b = body(
        activity(operation="merge", table="bad-name", col_names=["a", "A"], col_types=["integer", "nope"], col_values=["x", 1]),
        activity(),
        "junk",
    )
    assert locs(b) == [
        "user_activities[0].operation",
        "user_activities[0].table",
        "user_activities[0].col_names[1]",
        "user_activities[0].col_types[1]",
        "user_activities[0].col_values[0]",
        "user_activities[2]",
    ]


def test_long_values_truncated_in_messages():
    details = problems(body(activity(col_values=["9" * 5000, 2, "x", "2021-03-30 06:12:44"])))
    assert len(details[0]["message"]) < 300


def test_details_capped():
    bad = activity(col_values=["x", "y", 1, 2])
    details = problems(body(*[bad] * 600))
    assert len(details) == MAX_DETAILS + 1
    assert details[-1] == {"loc": "body", "message": f"too many problems; only the first {MAX_DETAILS} are reported"}


# --- limits ---


def test_too_many_activities():
    with pytest.raises(LimitExceeded) as info:
        validate(body(*[activity()] * 3), max_activities=2)
    assert info.value.limit_name == "max_activities"
    assert "3 activities" in info.value.message


def test_too_many_columns():
    n = 6
    a = activity(col_names=[f"c{i}" for i in range(n)], col_types=["integer"] * n, col_values=[1] * n)
    assert len(validate(body(a), max_columns=6)) == 1
    with pytest.raises(LimitExceeded) as info:
        validate(body(a), max_columns=5)
    assert info.value.limit_name == "max_columns"


@pytest.mark.parametrize("type_name, value", [("string", "é" * 60), ("bytes", "QUJD" * 20), ("geography", "POINT (1 2)" + " " * 100)])
def test_value_too_large(type_name, value):
    a = activity(col_names=["v"], col_types=[type_name], col_values=[value])
    validate(body(a), max_value_bytes=1000)
    with pytest.raises(LimitExceeded) as info:
        validate(body(a), max_value_bytes=len(value.encode()) - 1)
    assert info.value.limit_name == "max_value_bytes"
    assert info.value.message.startswith("user_activities[0].col_values[0] is ")


def test_record_too_large():
    a = activity(col_names=["r"], col_types=["record"], col_values=[{"k": "x" * 100}])
    validate(body(a), max_value_bytes=200)
    with pytest.raises(LimitExceeded) as info:
        validate(body(a), max_value_bytes=50)
    assert info.value.limit_name == "max_value_bytes"


def nested(depth):
    value = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_record_depth():
    ok = activity(col_names=["r"], col_types=["record"], col_values=[nested(15)])
    validate(body(ok), max_record_depth=15)
    deep = activity(col_names=["r"], col_types=["record"], col_values=[{"k": [nested(14)]}])
    with pytest.raises(LimitExceeded) as info:
        validate(body(deep), max_record_depth=15)
    assert info.value.limit_name == "max_record_depth"
    assert info.value.message == "user_activities[0].col_values[0] nests deeper than 15 levels"


def test_record_any_json_value_and_json_text():
    a = activity(col_names=["a", "b", "c"], col_types=["record"] * 3, col_values=[[1, 2], '{"k": [1]}', 7])
    assert validate(body(a))[0].col_values == [[1, 2], {"k": [1]}, 7]


def test_record_json_text_limits_apply_to_the_decoded_value():
    deep = activity(col_names=["r"], col_types=["record"], col_values=[json.dumps(nested(16))])
    with pytest.raises(LimitExceeded) as info:
        validate(body(deep), max_record_depth=15)
    assert info.value.limit_name == "max_record_depth"
    big = activity(col_names=["r"], col_types=["record"], col_values=[json.dumps(["x" * 100])])
    with pytest.raises(LimitExceeded):
        validate(body(big), max_value_bytes=50)


def test_record_unrepresentable():
    details = problems(body(activity(col_names=["r"], col_types=["record"], col_values=[{"big": 2**70}])))
    assert [d["loc"] for d in details] == ["user_activities[0].col_values[0]"]
    assert "1180591620717411303424 is outside the range a JSON column keeps exactly" in details[0]["message"]


# --- fuzz ---

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["insert", "delete", "t", "user_id", "integer", "string", "record", "geography", "bytes", "timestamp",
         "numeric", "2021-03-30 06:12:44", "POINT (1 2)", "QQ==", "1e999", "NaN", "{", "_ingest_x"]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["type", "coordinates", "geometries"])), children, max_size=5),
    ),
    max_leaves=30,
)
field_names = st.sampled_from(["operation", "table", "col_names", "col_types", "col_values", "x"])
activities = st.one_of(
    json_values,
    st.dictionaries(field_names, json_values, max_size=6),
    st.builds(
        lambda n, types, vals, op, table: {
            "operation": op, "table": table, "col_names": n, "col_types": types, "col_values": vals,
        },
        st.lists(st.sampled_from(["a", "b", "A", "1", "_TABLE_x", "c"]), max_size=4),
        st.lists(st.sampled_from(list(TYPE_NAMES) + ["INTEGER", "int"]), max_size=4),
        st.lists(json_values, max_size=4),
        st.sampled_from(["insert", "delete", "DELETE", "x"]),
        st.sampled_from(["t", "bad-name", ""]),
    ),
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"user_activities": st.lists(activities, max_size=5)}),
    st.dictionaries(st.sampled_from(["user_activities", "x"]), st.one_of(json_values, st.lists(activities, max_size=3))),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_fuzz_never_raises_anything_else(b):
    try:
        out = validate_batch(b, max_activities=4, max_columns=3, max_value_bytes=200, max_record_depth=3)
    except BatchInvalid as exc:
        assert exc.details and len(exc.details) <= MAX_DETAILS + 1
        for d in exc.details:
            assert type(d["loc"]) is str and type(d["message"]) is str and d["message"]
            assert "internal error" not in d["message"]
    except LimitExceeded as exc:
        assert exc.limit_name in ("max_activities", "max_columns", "max_value_bytes", "max_record_depth")
    else:
        assert isinstance(out, list) and out
        for a in out:
            assert isinstance(a, Activity)
            assert a.operation in ("insert", "delete")
            assert len(a.col_names) == len(a.col_types) == len(a.col_values) >= 1
            assert all(t in TYPE_NAMES for t in a.col_types)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(TYPE_NAMES)), min_size=1, max_size=4, unique=True), st.data())
def test_fuzz_output_is_canonical(types, data):
    """Validating the canonical output again changes nothing."""
    samples = {
        "string": st.text(alphabet=string.printable, max_size=5),
        "bytes": st.binary(max_size=6).map(lambda b: __import__("base64").b64encode(b).decode()),
        "integer": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(allow_nan=False, allow_infinity=False),
        "numeric": st.decimals(min_value=-(10**28), max_value=10**28, places=9, allow_nan=False).map(str),
        "bignumeric": st.decimals(min_value=-(10**37), max_value=10**37, places=20, allow_nan=False).map(str),
        "boolean": st.booleans(),
        "timestamp": st.datetimes().map(lambda d: d.isoformat() + "+01:30"),
        "date": st.dates().map(str),
        "time": st.times().map(str),
        "datetime": st.datetimes().map(str),
        "geography": st.tuples(st.floats(-180, 180), st.floats(-90, 90)).map(lambda p: f"POINT ({p[0]!r} {p[1]!r})"),
        "record": st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=3),
    }
    vals = [data.draw(st.one_of(st.none(), samples[t])) for t in types]
    a = {"operation": "insert", "table": "t", "col_names": [f"c_{t}" for t in types], "col_types": types, "col_values": vals}
    try:
        [first] = validate(body(a))
    except BatchInvalid as exc:
        # only the +01:30 shift can push a timestamp out of range
        assert all("outside 0001-01-01" in d["message"] for d in exc.details), exc.details
        return
    [second] = validate(body(first.to_dict()))
    assert second == first


number_texts = st.from_regex(r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,4})?\Z")


@settings(max_examples=500, deadline=None)
@given(number_texts, st.sampled_from(["integer", "float", "numeric", "bignumeric", "record", "timestamp", "string"]),
       st.booleans())
def test_fuzz_numbers_from_the_wire_are_kept_exactly_or_refused(text, typ, nested):
    from decimal import Decimal

    from app.schema.values import loads_exact

    value_text = '{"n": ' + text + "}" if nested and typ == "record" else text
    raw = ('{"user_activities": [{"operation": "insert", "table": "t", "col_names": ["c"], "col_types": ["'
           + typ + '"], "col_values": [' + value_text + "]}]}")
    try:
        [a] = validate_batch(loads_exact(raw.encode()), max_activities=10)
    except (BatchInvalid, LimitExceeded):
        return
    got = a.col_values[0]
    sent = Decimal(text)
    if typ in ("integer", "numeric", "bignumeric"):
        assert Decimal(got) == sent, (text, got)
    elif typ == "float":
        assert got == float(text)  # FLOAT64 is the nearest double, as in BigQuery
    elif typ == "record":
        number = got["n"] if nested else got
        assert Decimal(repr(number) if type(number) is float else number) == sent, (text, number)
    elif typ == "timestamp":
        import datetime as dt

        instant = dt.datetime.fromisoformat(got.replace("Z", "+00:00"))
        micros = (instant - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
        assert Decimal(micros).scaleb(-6) == sent, (text, got)
    else:
        raise AssertionError(f"{typ} accepted the number {text}")
