"""Per-type value validation and normalization (placeholder: being implemented)."""

from __future__ import annotations

from typing import Any


def _todo(value: Any) -> Any:
    return value


normalize_string = normalize_bytes = normalize_integer = normalize_float = _todo
normalize_numeric = normalize_bignumeric = normalize_boolean = normalize_timestamp = _todo
normalize_date = normalize_time = normalize_datetime = normalize_geography = normalize_record = _todo
