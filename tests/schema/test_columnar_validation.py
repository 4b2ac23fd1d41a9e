"""Columnar validation: `validate_runs` gives `runs_of(validate_batch(...))`'s verdicts, as runs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.schema import columnar_validation
from app.schema.columnar import runs_of
from app.schema.columnar_validation import validate_runs
from app.schema.types import TYPE_NAMES
from app.schema.validation import BatchInvalid, LimitExceeded, validate_batch
from tests.schema.test_properties import NEAR, VALID, junk, wire
from tests.schema.test_validation import activities, activity, bodies, body, validate

RUN_LIMITS = dict(max_activities=40, max_columns=6, max_value_bytes=2000, max_record_depth=4)


def verdict(validate, b):
    """What a validator makes of a body: its output or its error, comparable."""
    try:
        return "ok", validate(b)
    except BatchInvalid as exc:
        return "invalid", exc.details
    except LimitExceeded as exc:
        return "limit", (exc.message, exc.limit_name)


def run_rows(runs):
    return [(r.table, r.operation, r.col_names, r.col_types, r.key, r.batch.schema, r.activities()) for r in runs]


def assert_same_verdict(b, **limits):
    expected = verdict(lambda x: runs_of(validate_batch(x, **limits)), b)
    got = verdict(lambda x: validate_runs(x, **limits), b)
    assert got[0] == expected[0], (got, expected)
    if got[0] == "ok":
        assert run_rows(got[1]) == run_rows(expected[1])
    else:
        assert got[1] == expected[1]


def wire_value(type_name, clean):
    """A value of the column type as a client sends it: valid, or sometimes not unless `clean`."""
    valid = VALID[type_name].map(lambda p: p[0]) | st.none()
    if clean:
        return valid
    return st.one_of(*[valid] * 6, NEAR[type_name], junk.map(lambda p: p[0]))


@st.composite
def run_bodies(draw):
    """1 to 3 tables of 1 to 4 columns; activities interleave them, with odd spellings at times.

    Half the bodies hold valid values only (the columnar road), half anything."""
    clean = draw(st.booleans())
    shapes = []
    for t in range(draw(st.integers(1, 3))):
        types = draw(st.lists(st.sampled_from(list(TYPE_NAMES)), min_size=1, max_size=4))
        names = [f"c{j}" for j in range(len(types))]
        shapes.append((f"t{t}", names, types))
    acts = []
    for _ in range(draw(st.integers(1, 25))):
        table, names, types = draw(st.sampled_from(shapes))
        act = {
            "operation": draw(st.sampled_from(["insert"] * 6 + ["delete", "INSERT", "upsert", "upsert"])),
            "table": table,
            "col_names": list(names),
            "col_types": [draw(st.sampled_from([t] * 6 + [t.upper()])) for t in types],
            "col_values": [draw(wire_value(t, clean)) for t in types],
        }
        if act["operation"] == "upsert":  # a key of the first column(s), in odd spellings at times
            act["key"] = [draw(st.sampled_from([n, n.upper()])) for n in names[: draw(st.integers(1, len(names)))]]
        acts.append(act)
    if not clean and draw(st.integers(0, 4)) == 0:  # now and then a broken activity among them
        acts.insert(draw(st.integers(0, len(acts))), draw(activities))
    return {"user_activities": acts}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_bodies())
def test_validate_runs_is_runs_of_validate_batch(raw):
    b = wire(raw)
    validate_batch_verdict = verdict(lambda x: validate_batch(x, **RUN_LIMITS), b)  # also warms the column-set cache
    assert_same_verdict(b, **RUN_LIMITS)
    if validate_batch_verdict[0] == "ok":
        assert sum(map(len, validate_runs(b, **RUN_LIMITS))) == len(validate_batch_verdict[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_validate_runs_fuzz_same_verdict_as_validate_batch(b):
    assert_same_verdict(b, max_activities=4, max_columns=3, max_value_bytes=200, max_record_depth=3)


def test_validate_runs_limits_are_the_same():
    b = body(*[activity() for _ in range(3)])
    assert_same_verdict(b, max_activities=2)
    validate(b)  # cache the column set
    assert_same_verdict(b, max_activities=10, max_columns=3)  # 4 columns
    big = body(activity(col_values=[1, 2, "é" * 600, "2021-03-30 06:12:44"]), activity())
    assert_same_verdict(big, max_activities=10, max_value_bytes=1000)
    with pytest.raises(LimitExceeded):
        validate_runs(big, max_activities=10, max_value_bytes=1000)
    bad_and_big = body(activity(col_values=["x", 2, "ok", "2021-03-30 06:12:44"]), activity(col_values=[1, 2, "é" * 600, None]))
    assert_same_verdict(bad_and_big, max_activities=10, max_value_bytes=1000)


def test_validate_runs_groups_like_runs_of():
    other = activity(table="other")
    upper = activity(col_types=["INTEGER", "integer", "String", "datetime"])
    delete = activity(operation="delete")
    b = body(activity(), other, upper, activity(), delete, other, activity())
    validate(b)
    runs = validate_runs(b, max_activities=100)
    assert [(r.table, r.operation, len(r)) for r in runs] == [
        ("user_activities_table", "insert", 3), ("user_activities_table", "delete", 1),
        ("user_activities_table", "insert", 1), ("other", "insert", 2),
    ]
    assert run_rows(runs) == run_rows(runs_of(validate(b)))


@pytest.mark.parametrize("n", [1, 2, 500])
def test_common_bodies_never_take_the_per_activity_path(n, monkeypatch):
    """Once a column set was seen valid, a body in the common forms is built column by column."""
    from scripts.bench import workload

    readme = orjson_loads(workload.readme_batch(n))
    mixed = next(workload.mixed_bodies(n, n, seed=n))
    expected = [run_rows(runs_of(validate(b))) for b in (readme, mixed)]  # caches the column sets

    def refuse(*args, **kwargs):
        raise AssertionError("validate_batch called")

    monkeypatch.setattr(columnar_validation, "validate_batch", refuse)
    assert [run_rows(validate_runs(b, max_activities=10_000)) for b in (readme, mixed)] == expected


def orjson_loads(raw):
    from app.schema.values import loads_exact

    return loads_exact(raw)
