"""The OpenAPI models: they accept their own example and publish the contract's schema."""

from __future__ import annotations

import re

from app.api.models import EXAMPLE_ACTIVITY, EXAMPLE_REQUEST, ActivityIn, IngestRequest
from app.schema.identifiers import IDENTIFIER_PATTERN, check_table_name
from app.schema.types import TYPE_NAMES


def test_models_accept_the_example_and_publish_it():
    assert IngestRequest.model_validate(EXAMPLE_REQUEST).user_activities[0].table == "user_activities_table"
    assert ActivityIn.model_validate(dict(EXAMPLE_ACTIVITY, operation="DELETE")).operation == "delete"
    schema = IngestRequest.model_json_schema()
    assert schema["examples"] == [EXAMPLE_REQUEST]
    activity_schema = schema["$defs"]["ActivityIn"]
    assert activity_schema["examples"] == [EXAMPLE_ACTIVITY]
    assert activity_schema["properties"]["col_types"]["items"]["enum"] == list(TYPE_NAMES)
    assert activity_schema["additionalProperties"] is False


def test_published_name_pattern_agrees_with_the_validator():
    pattern = IngestRequest.model_json_schema()["$defs"]["ActivityIn"]["properties"]["table"]["pattern"]
    assert pattern == IDENTIFIER_PATTERN
    for name in ["t", "_t9", "User_Activities", "9t", "a-b", "a b", "us\u0435r", ""]:
        assert (re.search(pattern, name) is not None) == (check_table_name(name) is None), name
