"""The OpenAPI document: request examples cover every type and a delete, and stay valid."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.app import INGEST_PATH, create_app
from app.api.examples import REQUEST_EXAMPLES
from app.schema.types import TYPE_NAMES
from app.schema.validation import validate_batch
from app.settings import Settings


@pytest.fixture(scope="module")
def openapi(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("openapi"))
    with TestClient(create_app(settings)) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200
        return r.json()


def _operation(openapi):
    return openapi["paths"][INGEST_PATH]["post"]


def test_examples_are_in_the_document(openapi):
    body = _operation(openapi)["requestBody"]
    assert body["required"] is True
    content = body["content"]["application/json"]
    assert content["schema"] == {"$ref": "#/components/schemas/IngestRequest"}
    assert content["examples"] == REQUEST_EXAMPLES
    for name, example in content["examples"].items():
        assert example["summary"] and isinstance(example["value"], dict), name


def test_every_type_has_an_example_and_a_delete_exists():
    activities = [a for ex in REQUEST_EXAMPLES.values() for a in ex["value"]["user_activities"]]
    used = {t.lower() for a in activities for t in a["col_types"]}
    assert used >= set(TYPE_NAMES), set(TYPE_NAMES) - used
    assert len(TYPE_NAMES) == 13
    for type_name in TYPE_NAMES:  # and each type has an example of its own
        own = REQUEST_EXAMPLES[f"type_{type_name}"]["value"]["user_activities"]
        assert any(t == type_name for a in own for t in a["col_types"]), type_name
    assert any(a["operation"] == "delete" for a in REQUEST_EXAMPLES["delete"]["value"]["user_activities"])


@pytest.mark.parametrize("name", sorted(REQUEST_EXAMPLES))
def test_every_example_validates(name):
    body = REQUEST_EXAMPLES[name]["value"]
    activities = validate_batch(body, max_activities=10_000)
    assert len(activities) == len(body["user_activities"])


@pytest.mark.parametrize("name", ["readme", "every_type", "delete", "type_geography"])
def test_examples_are_accepted_by_the_api(tmp_path, name):
    with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
        r = c.post(INGEST_PATH, json=REQUEST_EXAMPLES[name]["value"])
        assert r.status_code == 200, r.text


def test_error_responses_are_documented(openapi):
    responses = _operation(openapi)["responses"]
    for code in ("400", "401", "403", "409", "413", "415", "422", "429", "503"):
        assert code in responses, code
        schema = responses[code]["content"]["application/json"]["schema"]
        assert schema["required"] == ["error", "message", "details"], code
        assert responses[code]["description"]
    assert responses["200"]["content"]["application/json"]["schema"]["required"] == ["error", "message", "accepted", "batch_id", "receipt"]
    params = {p["name"]: p for p in _operation(openapi)["parameters"]}
    assert "Idempotency-Key" in params
    # Internal pages stay out of the document.
    assert "/status" not in openapi["paths"] and "/metrics" not in openapi["paths"]


@pytest.mark.parametrize("page, assets", [("/docs", {"js", "css", "png"}), ("/redoc", {"js", "png"})])
def test_docs_pages_load_only_local_assets(tmp_path, page, assets):
    import re

    with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = set(re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text))
        urls |= set(re.findall(r"""url:\s*'([^']+)'""", r.text))  # the OpenAPI document Swagger UI fetches
        assert "/openapi.json" in urls or "/openapi.json" in r.text
        assert not [u for u in urls if "//" in u], f"{page} must not load anything from another host: {urls}"
        assert "googleapis" not in r.text and "cdn" not in r.text.lower()
        seen = set()
        for url in urls - {"/openapi.json"}:
            asset = c.get(url)
            assert asset.status_code == 200, url
            kind = url.rsplit(".", 1)[-1]
            expected = {"js": "javascript", "css": "text/css", "png": "image/png"}[kind]
            assert expected in asset.headers["content-type"] and len(asset.content) > 100, url
            seen.add(kind)
        assert seen == assets
        if page == "/docs":  # Swagger UI 5 renders OpenAPI 3.1, which FastAPI writes
            assert c.get("/openapi.json").json()["openapi"].startswith("3.1")
            assert re.search(rb'PACKAGE_VERSION:"5\.', c.get("/docs-assets/swagger-ui-bundle.js").content)
