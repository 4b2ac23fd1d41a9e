"""Table and column name rules."""

from __future__ import annotations

import pytest

from app.schema.identifiers import MAX_COLUMN_NAME, MAX_TABLE_NAME, check_column_name, check_table_name


@pytest.mark.parametrize(
    "name", ["user_activities_table", "t", "_t", "T1", "a_b_c_123", "__x", "A" * MAX_TABLE_NAME, "_ingest", "ingest_x"]
)
def test_valid_table_names(name):
    assert check_table_name(name) is None


@pytest.mark.parametrize(
    "name", ["user_id", "occured_at", "c", "_c", "C9", "x" * MAX_COLUMN_NAME, "table_", "_tablex", "partition", "_rowid"]
)
def test_valid_column_names(name):
    assert check_column_name(name) is None


@pytest.mark.parametrize("check", [check_table_name, check_column_name])
@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "must not be empty"),
        ("1abc", "starts with a digit"),
        ("9", "starts with a digit"),
        ("a-b", "'-'"),
        ("a b", "U+0020 SPACE"),
        ("a.b", "'.'"),
        ("a$", "'$'"),
        ("tab\tle", "U+0009"),
        ("name\n", "U+000A"),  # `$` of the pattern admits a final newline; the check must not
        ("_ingest_x", "reserved for the pipeline"),
        ("_INGEST_offsets", "reserved for the pipeline"),
        ("_Ingest_", "reserved for the pipeline"),
    ],
)
def test_invalid_names(check, name, fragment):
    message = check(name)
    assert message is not None and fragment in message, message


@pytest.mark.parametrize("check", [check_table_name, check_column_name])
@pytest.mark.parametrize(
    "name, code",
    [
        ("us\u0435r_id", "U+0435 CYRILLIC SMALL LETTER IE"),  # Cyrillic 'е'
        ("\u0391BC", "U+0391 GREEK CAPITAL LETTER ALPHA"),
        ("caf\u00e9", "U+00E9"),
        ("a\u200bb", "U+200B ZERO WIDTH SPACE"),
        ("\uff41bc", "U+FF41 FULLWIDTH LATIN SMALL LETTER A"),
        ("x\u0663", "U+0663 ARABIC-INDIC DIGIT THREE"),
    ],
)
def test_unicode_look_alikes_refused(check, name, code):
    message = check(name)
    assert message is not None and "non-ASCII" in message and code in message, message


@pytest.mark.parametrize("check", [check_table_name, check_column_name])
@pytest.mark.parametrize("name", [None, 1, 1.5, True, ["a"], {"a": 1}])
def test_non_strings_refused(check, name):
    message = check(name)
    assert message is not None and "must be a string" in message


def test_length_limits():
    assert check_table_name("a" * (MAX_TABLE_NAME + 1)) == "table name is 1025 characters long; at most 1024 are allowed"
    assert check_column_name("a" * (MAX_COLUMN_NAME + 1)) == "column name is 301 characters long; at most 300 are allowed"
    assert check_table_name("a" * 301) is None


@pytest.mark.parametrize(
    "name",
    [
        "_TABLE_x",
        "_table_",
        "_File_name",
        "_PARTITION",
        "_partitiontime",
        "_PARTITIONDATE",
        "_ROW_TIMESTAMP",
        "_row_timestamp_x",
        "__ROOT__",
        "__root__x",
        "_COLIDENTIFIER",
        "_colidentifier1",
        "_CHANGE_TYPE",
        "_change_type",
        "_CHANGE_SEQUENCE_NUMBER",
        "_change_sequence_number_x",
        "_CHANGE_TIMESTAMP",
        "_Change_Timestamp2",
    ],
)
def test_reserved_column_prefixes(name):
    message = check_column_name(name)
    assert message is not None and "reserved prefix" in message, message


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("_change_type", "_CHANGE_TYPE"),
        ("_CHANGE_SEQUENCE_NUMBER", "_CHANGE_SEQUENCE_NUMBER"),
        ("_change_timestamp_utc", "_CHANGE_TIMESTAMP"),
    ],
)
def test_change_data_capture_pseudo_columns_are_named_in_the_refusal(name, prefix):
    assert check_column_name(name) == (
        f"column name {name!r} starts with the reserved prefix '{prefix}' (reserved by BigQuery)"
    )


@pytest.mark.parametrize("name", ["change_type", "_change", "_changes", "_change_kind", "x_change_type"])
def test_names_near_the_change_prefixes_are_fine(name):
    assert check_column_name(name) is None


@pytest.mark.parametrize("name", ["_TABLE_x", "_PARTITION", "__ROOT__", "_CHANGE_TYPE"])
def test_reserved_column_prefixes_are_fine_for_tables(name):
    assert check_table_name(name) is None


def test_messages_truncate_long_names():
    message = check_column_name("-" * 250)
    assert message is not None and len(message) < 200
