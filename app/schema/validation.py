"""Batch validation at the API edge: JSON body -> canonical `Activity` list, or every problem.

`validate_batch(body, ...)` takes the JSON-decoded request body (any Python value) and
either returns the validated, canonical activities or raises:

- `BatchInvalid(details)`: the body breaks the contract; `details` lists every problem
  found (capped at `MAX_DETAILS`), each `{"loc": "user_activities[3].col_values[2]",
  "message": "..."}`. The API answers 400/422 with it.
- `LimitExceeded(message, limit_name)`: too many activities or columns, a value too large
  or a record nested too deeply. The API answers 413. Raised at the first excess.

It never raises anything else, whatever the input (fuzzed in tests).

`app.schema.columnar_validation.validate_runs` gives the same verdicts as runs.

Contract (what the OpenAPI models in `app.api.models` describe):

- the body is an object with exactly one key, `user_activities`, a non-empty list;
- each activity is an object with exactly the keys operation, table, col_names,
  col_types, col_values, and `key` for an upsert (unknown keys refused, missing keys
  reported, `key` on another operation refused);
- `operation` is "insert", "delete" or "upsert" in any letter case (canonical: lower case);
- an upsert's `key` is a non-empty list of distinct names from col_names (canonical: their
  spelling in col_names), each of a type in `KEY_TYPES`, whose values are not null;
- `table` and each column name follow `app.schema.identifiers`;
- col_names, col_types and col_values are lists of equal length with at least one entry
  (a delete must name at least one column to match rows on);
- column names are unique within an activity, compared case-insensitively (BigQuery
  column names are case-insensitive); their spelling is kept as sent;
- col_types are names from `app.schema.types.TYPES` in any letter case (canonical: lower);
- each value is null or accepted by its type's normalizer (`app.schema.values`).

Locations: `body` for the body itself, `user_activities`, `user_activities[i]` (the
activity, also for unknown keys and unequal lengths), `user_activities[i].<key>` and
`user_activities[i].<list>[j]` (`key[k]` too; a null key value at its `col_values[j]`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson

from app.schema.activity import ACTIVITY_FIELDS, KEY_FIELD, KEY_TYPES, Activity
from app.schema.identifiers import check_column_name, check_table_name
from app.schema.types import TYPE_NAMES, TYPES
from app.schema.values import brief

__all__ = [
    "BatchInvalid",
    "LimitExceeded",
    "ValidationContext",
    "ValueTooLarge",
    "OPERATIONS",
    "validate_batch",
    "validation_context",
    "MAX_DETAILS",
]

log = logging.getLogger(__name__)

MAX_DETAILS = 1000

# --- errors -----------------------------------------------------------------------


class BatchInvalid(Exception):
    """The request body breaks the contract; `details` lists every problem found."""

    def __init__(self, details: list[dict[str, str]]):
        self.details = details
        first = details[0]["message"] if details else "invalid batch"
        super().__init__(f"{len(details)} problem(s); first: {first}")


class LimitExceeded(Exception):
    """The request is over a size limit (maps to HTTP 413)."""

    def __init__(self, message: str, limit_name: str):
        self.message = message
        self.limit_name = limit_name
        super().__init__(message)


class _TooManyDetails(Exception):
    pass

# --- validation -------------------------------------------------------------------
#
# Two paths per activity. The fast path handles a well-formed activity whose
# (table, col_names, col_types) combination was seen valid before (cached), normalizing
# the values in one comprehension. Anything unusual (a new column set, any error, a
# value over a limit) goes to the slow path, which checks everything and reports every
# problem with its location.

_FIELDS = frozenset(ACTIVITY_FIELDS)
_UPSERT_FIELDS = _FIELDS | {KEY_FIELD}
OPERATIONS = {"insert": "insert", "delete": "delete", "upsert": "upsert"}
_CACHE_MAX = 4096


class ValueTooLarge(Exception):
    """A value is over a limit; the slow path turns it into LimitExceeded with its loc."""

    def __init__(self, message: str, limit_name: str):
        self.message = message
        self.limit_name = limit_name


def _utf8_len(s: str) -> int:
    if s.isascii():
        return len(s)
    return len(s.encode("utf-8", "surrogatepass"))


def _too_deep(value: Any, limit: int) -> bool:
    """True when a dict/list nests deeper than `limit` levels (the value itself is level 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        if depth > limit:
            return True
        for c in v.values() if type(v) is dict else v:
            tc = type(c)
            if tc is dict or tc is list:
                push((c, depth + 1))
    return False


class ValidationContext:
    """Limit-aware normalizers and the cache of valid column sets, per limit values."""

    def __init__(self, max_value_bytes: int, max_record_depth: int):
        safe_chars = max_value_bytes // 4  # a str this short cannot exceed the byte limit

        def check_str(v: str) -> None:
            if len(v) > safe_chars:
                size = _utf8_len(v)
                if size > max_value_bytes:
                    raise ValueTooLarge(f"is {size} bytes; at most {max_value_bytes} bytes per value are allowed", "max_value_bytes")

        def check_json_size(v: Any) -> None:
            size = len(orjson.dumps(v))  # canonical records always encode (values.normalize_record)
            if size > max_value_bytes:
                raise ValueTooLarge(
                    f"is {size} bytes as JSON; at most {max_value_bytes} bytes per value are allowed", "max_value_bytes"
                )

        def check_depth(v: Any) -> None:
            if _too_deep(v, max_record_depth):
                raise ValueTooLarge(f"nests deeper than {max_record_depth} levels", "max_record_depth")

        def sized(normalize: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def normalize_sized(v: Any) -> Any:
                if type(v) is str:
                    check_str(v)
                return normalize(v)

            return normalize_sized

        normalize_record = TYPES["record"].normalize

        def sized_record(v: Any) -> Any:
            # A record comes as a JSON value or as JSON text; the limits apply to the value.
            as_text = type(v) is str
            if as_text:
                check_str(v)
            elif type(v) is dict or type(v) is list:
                check_depth(v)  # before the normalizer walks it
            canonical = normalize_record(v)
            if type(canonical) is dict or type(canonical) is list:
                if as_text:
                    check_depth(canonical)
                check_json_size(canonical)
            return canonical

        self.normalizers: dict[str, Callable[[Any], Any]] = {}
        for name, spec in TYPES.items():
            if name in ("string", "bytes", "geography"):
                self.normalizers[name] = sized(spec.normalize)
            elif name == "record":
                self.normalizers[name] = sized_record
            else:
                # Other types accept only short canonical text; a huge string is refused by
                # the normalizer itself with a brief message.
                self.normalizers[name] = spec.normalize
        # (table, names tuple, types tuple[, key tuple as sent]) -> Shape, for valid sets only
        self.schemas: dict[tuple, Shape] = {}

    def remember(self, cache_key: tuple, lowered: list[str], key: list[str] | None = None) -> None:
        """A valid shape; `key`: an upsert's key, canonical (its columns' spelling in col_names)."""
        if len(self.schemas) >= _CACHE_MAX:
            self.schemas.clear()
        names = [n.lower() for n in cache_key[1]]
        positions = tuple(names.index(k.lower()) for k in key) if key is not None else ()
        self.schemas[cache_key] = (lowered, tuple(self.normalizers[t] for t in lowered), positions, key)


# (lowered types, their normalizers, key column positions, canonical key or None)
Shape = tuple[list[str], tuple[Callable[[Any], Any], ...], tuple[int, ...], "list[str] | None"]


def shape_cache_key(table: Any, names: Any, types: Any, key: Any) -> tuple:
    """The cache key of an activity's shape (TypeError for unhashable garbage)."""
    if key is None:
        return (table, tuple(names), tuple(types))
    return (table, tuple(names), tuple(types), tuple(key))


_contexts: dict[tuple[int, int], ValidationContext] = {}


def validation_context(max_value_bytes: int, max_record_depth: int) -> ValidationContext:
    key = (max_value_bytes, max_record_depth)
    ctx = _contexts.get(key)
    if ctx is None:
        if len(_contexts) >= 16:
            _contexts.clear()
        ctx = _contexts[key] = ValidationContext(max_value_bytes, max_record_depth)
    return ctx


def validate_batch(
    body: Any,
    *,
    max_activities: int,
    max_columns: int = 10000,
    max_value_bytes: int = 1 << 20,
    max_record_depth: int = 15,
) -> list[Activity]:
    """Validate and normalize a decoded request body (see the module docstring)."""
    details: list[dict[str, str]] = []
    try:
        result = _validate(body, details, max_activities, max_columns, validation_context(max_value_bytes, max_record_depth))
    except (LimitExceeded, BatchInvalid):
        raise
    except _TooManyDetails:
        details.append({"loc": "body", "message": f"too many problems; only the first {MAX_DETAILS} are reported"})
        raise BatchInvalid(details) from None
    except Exception:  # a bug must not become a 500 with a stack trace for the client
        log.exception("validate_batch failed unexpectedly")
        details.append({"loc": "body", "message": "the request could not be validated (internal error)"})
        raise BatchInvalid(details) from None
    if details:
        raise BatchInvalid(details)
    return result


def _validate(
    body: Any, details: list[dict[str, str]], max_activities: int, max_columns: int, ctx: ValidationContext
) -> list[Activity]:
    def add(loc: str, message: str) -> None:
        if len(details) >= MAX_DETAILS:
            raise _TooManyDetails
        details.append({"loc": loc, "message": message})

    if type(body) is not dict:
        add("body", f"expected a JSON object with the key 'user_activities', got {brief(body)}")
        return []
    for key in body:
        if key != "user_activities":
            add("body", f"unknown key {brief(key)}; the body has only the key 'user_activities'")
    if "user_activities" not in body:
        add("user_activities", "missing: the body must have the key 'user_activities' (a list of activities)")
        return []
    activities = body["user_activities"]
    if type(activities) is not list:
        add("user_activities", f"expected a list of activities, got {brief(activities)}")
        return []
    if not activities:
        add("user_activities", "at least one activity is required")
        return []
    if len(activities) > max_activities:
        raise LimitExceeded(
            f"{len(activities)} activities in one request; at most {max_activities} are allowed (split the batch)",
            "max_activities",
        )

    out: list[Activity] = []
    append_out = out.append
    schemas_get = ctx.schemas.get

    for i, act in enumerate(activities):
        # Fast path: a well-formed activity with a known-valid column set and valid values.
        size = len(act) if type(act) is dict else 0
        if size == 5 or size == 6:
            try:
                op = OPERATIONS[act["operation"]]
                table = act["table"]
                names = act["col_names"]
                types = act["col_types"]
                vals = act["col_values"]
                if size == 5:
                    schema = schemas_get((table, tuple(names), tuple(types))) if op != "upsert" else None
                else:
                    key = act[KEY_FIELD]
                    schema = schemas_get((table, tuple(names), tuple(types), tuple(key))) if op == "upsert" else None
            except (KeyError, TypeError):  # missing key, unhashable or non-iterable garbage
                schema = None
            if schema is not None and type(vals) is list and type(names) is list and type(types) is list:
                lowered, normalizers, positions, canonical_key = schema
                if len(vals) == len(lowered) <= max_columns:
                    try:
                        new_vals = [None if v is None else f(v) for f, v in zip(normalizers, vals)]
                    except (ValueError, ValueTooLarge):
                        pass
                    else:
                        if canonical_key is None:
                            append_out(Activity(op, table, list(names), lowered.copy(), new_vals))  # type: ignore[arg-type]
                            continue
                        if not any(new_vals[p] is None for p in positions):
                            append_out(Activity(op, table, list(names), lowered.copy(), new_vals, canonical_key.copy()))  # type: ignore[arg-type]
                            continue
        activity = _validate_activity(i, act, details, add, max_columns, ctx)
        if activity is not None:
            append_out(activity)
    return out


def _check_names(names: list) -> list[tuple[int, str]]:
    """(index, message) for every bad or duplicate column name."""
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        error = check_column_name(name)
        if error is not None:
            problems.append((j, error))
            continue
        low = name.lower()
        first = seen.get(low)
        if first is None:
            seen[low] = j
        else:
            problems.append(
                (
                    j,
                    f"duplicate column name {brief(name)}: same as col_names[{first}] {brief(names[first])} "
                    "(column names are case-insensitive)",
                )
            )
    return problems


def _resolve_types(types: list) -> tuple[list[str], list[tuple[int, str]]]:
    lowered: list[str] = []
    problems: list[tuple[int, str]] = []
    for j, t in enumerate(types):
        if type(t) is not str:
            problems.append((j, f"column type must be a string, got {brief(t)}"))
            lowered.append("")
            continue
        low = t.lower()
        if low not in TYPES:
            problems.append((j, f"unknown column type {brief(t)}; expected one of {', '.join(TYPE_NAMES)}"))
        lowered.append(low)
    return lowered, problems


def _validate_activity(
    i: int, act: Any, details: list[dict[str, str]], add: Callable[[str, str], None], max_columns: int, ctx: ValidationContext
) -> Activity | None:
    """Check one activity completely, reporting every problem; the Activity if it is valid."""
    at = f"user_activities[{i}]"
    if type(act) is not dict:
        add(at, f"expected an activity object, got {brief(act)}")
        return None
    n_details = len(details)
    if act.keys() != _FIELDS and act.keys() != _UPSERT_FIELDS:
        for field in act:
            if field not in _UPSERT_FIELDS:
                add(
                    at,
                    f"unknown key {brief(field)}; an activity has exactly the keys {', '.join(ACTIVITY_FIELDS)} "
                    f"(and {KEY_FIELD} for an upsert)",
                )
        for f in ACTIVITY_FIELDS:
            if f not in act:
                add(f"{at}.{f}", "missing")

    op: str | None = None
    if "operation" in act:
        op_raw = act["operation"]
        if type(op_raw) is str and op_raw.lower() in OPERATIONS:
            op = op_raw.lower()
        else:
            add(f"{at}.operation", f"expected 'insert', 'delete' or 'upsert', got {brief(op_raw)}")

    table = act.get("table")
    table_ok = False
    if "table" in act:
        error = check_table_name(table)
        if error is None:
            table_ok = True
        else:
            add(f"{at}.table", error)

    lists: dict[str, list | None] = {}
    for field in ("col_names", "col_types", "col_values"):
        lst = act.get(field)
        lists[field] = None
        if field not in act:
            continue
        if type(lst) is not list:
            add(f"{at}.{field}", f"expected a list, got {brief(lst)}")
            continue
        if len(lst) > max_columns:
            raise LimitExceeded(
                f"{at}.{field} has {len(lst)} entries; at most {max_columns} columns are allowed", "max_columns"
            )
        lists[field] = lst
    names, types, vals = lists["col_names"], lists["col_types"], lists["col_values"]

    key_present = KEY_FIELD in act
    if op == "upsert" and not key_present:
        add(f"{at}.{KEY_FIELD}", "missing: an upsert needs key, the list of the columns that identify a row")
    elif op is not None and op != "upsert" and key_present:
        add(
            f"{at}.{KEY_FIELD}",
            f"only an upsert takes a key, not {op} (an insert on a table with a key is an upsert on that key)",
        )

    names_ok = types_ok = False
    if names is not None:
        problems = _check_names(names)
        for j, msg in problems:
            add(f"{at}.col_names[{j}]", msg)
        names_ok = not problems
    lowered: list[str] = []
    if types is not None:
        lowered, problems = _resolve_types(types)
        for j, msg in problems:
            add(f"{at}.col_types[{j}]", msg)
        types_ok = not problems

    if names is not None and types is not None and vals is not None:
        n = len(names)
        if n != len(types) or n != len(vals):
            add(
                at,
                f"col_names, col_types and col_values must have the same length; got {n}, {len(types)} and {len(vals)}",
            )
        elif n == 0:
            if op == "delete":
                add(
                    f"{at}.col_names",
                    "a delete must name at least one column (rows whose columns equal all given values are deleted)",
                )
            else:
                add(f"{at}.col_names", "at least one column is required")
    key: list[str] | None = None
    key_positions: list[int] = []
    if op == "upsert" and key_present:
        sized = types_ok and names is not None and len(lowered) == len(names)
        key, key_positions = _check_key(at, act[KEY_FIELD], names if names_ok else None, lowered if sized else None, add)
    if names is not None and types is not None and vals is not None:
        if len(names) == len(types) == len(vals) > 0 and names_ok and types_ok and table_ok:
            if op != "upsert":
                ctx.remember((table, tuple(names), tuple(types)), lowered)
            elif key is not None:
                ctx.remember((table, tuple(names), tuple(types), tuple(act[KEY_FIELD])), lowered, key)

    new_vals: list[Any] = []
    if types is not None and vals is not None:
        normalizers = ctx.normalizers
        for j, (t, v) in enumerate(zip(lowered, vals)):
            if v is None:
                new_vals.append(None)
                continue
            f = normalizers.get(t)
            if f is None:
                continue  # unknown type, already reported
            try:
                new_vals.append(f(v))
            except ValueError as exc:
                add(f"{at}.col_values[{j}]", str(exc))
            except ValueTooLarge as exc:
                raise LimitExceeded(f"{at}.col_values[{j}] {exc.message}", exc.limit_name) from None

    if key is not None and len(new_vals) == len(names or ()):
        for j in key_positions:
            if new_vals[j] is None:
                add(f"{at}.col_values[{j}]", f"a key column's value cannot be null ({brief(names[j])} is in key)")  # type: ignore[index]

    if len(details) != n_details or op is None or names is None:
        return None
    return Activity(op, table, list(names), lowered, new_vals, key)  # type: ignore[arg-type]


def _check_key(
    at: str, raw: Any, names: list | None, lowered: list[str] | None, add: Callable[[str, str], None]
) -> tuple[list[str] | None, list[int]]:
    """An upsert's key, canonical (each name spelled as in col_names), and its column
    positions; (None, []) after reporting its problems. `names`/`lowered` None: invalid."""
    loc = f"{at}.{KEY_FIELD}"
    if type(raw) is not list:
        add(loc, f"expected a list of column names, got {brief(raw)}")
        return None, []
    if not raw:
        add(loc, "at least one key column is required")
        return None, []
    index = {n.lower(): j for j, n in enumerate(names)} if names is not None else None
    canonical: list[str] = []
    positions: list[int] = []
    seen: set[str] = set()
    ok = True
    for k, name in enumerate(raw):
        if type(name) is not str:
            add(f"{loc}[{k}]", f"expected a column name, got {brief(name)}")
            ok = False
            continue
        low = name.lower()
        if low in seen:
            add(f"{loc}[{k}]", f"{brief(name)} appears more than once in key")
            ok = False
            continue
        seen.add(low)
        if index is None:
            ok = False  # col_names is invalid, reported already
            continue
        j = index.get(low)
        if j is None:
            add(f"{loc}[{k}]", f"{brief(name)} is not in col_names; key columns must be sent with the row")
            ok = False
            continue
        if lowered is not None and lowered[j] not in KEY_TYPES:
            add(
                f"{loc}[{k}]",
                f"{brief(name)} is {lowered[j]}; a key column must be of a type that compares exactly, "
                f"not float, record or geography",
            )
            ok = False
            continue
        canonical.append(names[j])  # type: ignore[index]
        positions.append(j)
    return (canonical, positions) if ok and lowered is not None else (None, [])
