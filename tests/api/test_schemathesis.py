"""Schemathesis against the app's own OpenAPI document (`/openapi.json` of `create_app`).

Generated requests (valid and invalid by the schema) go to the ASGI app with a real local
broker in a temp dir. Checked: no 5xx, status codes, content types, headers and bodies
as documented. Bounded: at most `MAX_EXAMPLES` cases per operation (about 100 in all).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.openapi import from_asgi

from app.api.app import create_app
from app.settings import Settings

MAX_EXAMPLES = 90  # the ingest operation; the GETs have no inputs and run once each
STATUSES: Counter = Counter()

_tmp = None


def _app():
    import tempfile

    global _tmp
    _tmp = tempfile.TemporaryDirectory(prefix="schemathesis-")
    return create_app(Settings(data_dir=_tmp.name, max_body_bytes=256 * 1024, max_activities=200))


app = _app()
schema = from_asgi("/openapi.json", app)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module", autouse=True)
def _lifespan():
    from fastapi.testclient import TestClient

    with TestClient(app):  # runs the lifespan: the broker exists while cases run
        yield


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_schema(case):
    response = case.call()
    STATUSES[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_generated_cases_were_both_accepted_and_refused():
    """Runs after the generated tests: both positive (200) and negative (4xx) cases reached the app."""
    ingest = {status: n for (label, status), n in STATUSES.items() if label.startswith("POST")}
    assert ingest.get(200, 0) > 0, STATUSES
    assert sum(n for status, n in ingest.items() if 400 <= status < 500) > 0, STATUSES
    assert not [s for (_, s) in STATUSES if s >= 500], STATUSES
