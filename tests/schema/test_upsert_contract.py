"""The upsert contract at the API edge: `key` required, checked and refused where it does not belong."""

from __future__ import annotations

import pytest

from app.schema.activity import Activity
from app.schema.columnar import runs_of
from app.schema.columnar_validation import validate_runs
from tests.schema.test_validation import body, problems, validate


def upsert(**overrides):
    a = {
        "operation": "upsert",
        "table": "users",
        "col_names": ["user_id", "email", "plan"],
        "col_types": ["integer", "string", "string"],
        "col_values": [7, "a@example.com", "pro"],
        "key": ["user_id"],
    }
    a.update(overrides)
    return a


def test_an_upsert_validates_with_its_key_spelled_as_in_col_names():
    for _ in range(2):  # the second time through the cached fast path
        [a] = validate(body(upsert(operation="UPSERT", key=["USER_ID"])))
        assert a == Activity("upsert", "users", ["user_id", "email", "plan"], ["integer", "string", "string"],
                             [7, "a@example.com", "pro"], ["user_id"])
        assert a.to_dict()["key"] == ["user_id"]


def test_a_two_column_key_and_every_exact_type_are_accepted():
    types = ["string", "bytes", "integer", "numeric", "bignumeric", "boolean", "timestamp", "date", "time", "datetime"]
    values = ["s", "AQI=", 1, "1.5", "12345678901234567890.5", True, "2024-01-01T00:00:00Z", "2024-01-01", "01:02:03",
              "2024-01-01T01:02:03"]
    for typ, value in zip(types, values):
        [a] = validate(body(upsert(col_names=["k", "j"], col_types=[typ, "integer"], col_values=[value, 1], key=["k", "j"])))
        assert a.key == ["k", "j"]


def test_key_is_required_for_upsert():
    a = upsert()
    del a["key"]
    [d] = problems(body(a))
    assert d["loc"] == "user_activities[0].key" and "missing" in d["message"]


@pytest.mark.parametrize("op", ["insert", "delete", "Insert"])
def test_key_is_refused_on_other_operations(op):
    [d] = problems(body(upsert(operation=op)))
    assert d["loc"] == "user_activities[0].key" and "only an upsert takes a key" in d["message"]


@pytest.mark.parametrize(
    "key, loc, words",
    [
        ("user_id", "user_activities[0].key", "expected a list"),
        ([], "user_activities[0].key", "at least one"),
        ([1], "user_activities[0].key[0]", "expected a column name"),
        (["user_id", "USER_ID"], "user_activities[0].key[1]", "more than once"),
        (["nope"], "user_activities[0].key[0]", "not in col_names"),
    ],
)
def test_a_bad_key_names_its_entry(key, loc, words):
    [d] = problems(body(upsert(key=key)))
    assert d["loc"] == loc and words in d["message"], d


@pytest.mark.parametrize("typ, value", [("float", 1.5), ("record", {"a": 1}), ("geography", "POINT(1 2)")])
def test_inexact_key_types_are_refused(typ, value):
    [d] = problems(body(upsert(col_names=["k", "v"], col_types=[typ, "string"], col_values=[value, "x"], key=["k"])))
    assert d["loc"] == "user_activities[0].key[0]" and f"is {typ}" in d["message"]


def test_a_null_key_value_names_its_cell_on_both_paths():
    b = body(upsert(), upsert(col_values=[8, None, None]), upsert(col_values=[None, "x", "y"]))
    for _ in range(2):  # after the shape is cached too
        [d] = problems(b)
        assert d["loc"] == "user_activities[2].col_values[0]" and "cannot be null" in d["message"]
        with pytest.raises(Exception) as info:
            validate_runs(b, max_activities=10)
        assert info.value.details == [d]


def test_runs_keep_upserts_apart_by_key_and_from_inserts():
    ins = {k: v for k, v in upsert(operation="insert").items() if k != "key"}
    b = body(upsert(), upsert(col_values=[8, None, "x"]), ins, upsert(col_names=["user_id", "email", "plan"], key=["user_id", "email"]))
    validate(b)
    runs = validate_runs(b, max_activities=10)
    assert [(r.operation, r.key, len(r)) for r in runs] == [
        ("upsert", ["user_id"], 2), ("insert", None, 1), ("upsert", ["user_id", "email"], 1)
    ]
    assert [(r.operation, r.key, r.activities()) for r in runs] == [
        (r.operation, r.key, r.activities()) for r in runs_of(validate(b))
    ]


def test_a_body_of_upserts_is_built_column_by_column_once_its_shape_is_known(monkeypatch):
    from app.schema import columnar_validation

    b = body(*[upsert(col_values=[i, f"u{i}@example.com", "pro"]) for i in range(50)])
    expected = [(r.key, r.activities()) for r in runs_of(validate(b))]  # caches the shape

    def refuse(*args, **kwargs):
        raise AssertionError("validate_batch called")

    monkeypatch.setattr(columnar_validation, "validate_batch", refuse)
    assert [(r.key, r.activities()) for r in validate_runs(b, max_activities=100)] == expected
