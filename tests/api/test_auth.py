"""API keys: plain and sha256 forms, both headers, 401 otherwise; health stays open."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.api.auth import parse_api_keys
from app.runtime import UnsafeConfiguration, refuse_open_unauthenticated
from app.settings import Settings
from tests.support.processes import ROOT

BODY = json.loads((ROOT / "examples" / "readme.json").read_text())
PATH = "/api-log/v1/"


@pytest.fixture
def client(tmp_path):
    digest = hashlib.sha256(b"second-key").hexdigest()
    with TestClient(create_app(Settings(data_dir=tmp_path, api_keys=f"first-key, sha256:{digest}"))) as c:
        yield c


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"X-API-Key": "first-key "}, 401),
        ({"Authorization": "Basic Zmlyc3Qta2V5"}, 401),
        ({"Authorization": "Bearer first-key"}, 200),
        ({"X-API-Key": "first-key"}, 200),
        ({"Authorization": "Bearer second-key"}, 200),
        ({"X-API-Key": f"sha256:{hashlib.sha256(b'second-key').hexdigest()}"}, 401),  # a digest is not a key
    ],
)
def test_ingest_needs_a_configured_key(client, headers, status):
    r = client.post(PATH, json=BODY, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"] is True and "first-key" not in r.text


def test_health_stays_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_bad_digest_config_is_refused():
    with pytest.raises(ValueError):
        parse_api_keys("sha256:xyz")
    assert parse_api_keys(" , ") == []


@pytest.mark.parametrize(
    "host, keys, allow, refused",
    [
        ("0.0.0.0", None, False, True),
        ("0.0.0.0", "k", False, False),
        ("0.0.0.0", None, True, False),
        ("127.0.0.1", None, False, False),
        ("localhost", None, False, False),
        ("::1", None, False, False),
    ],
)
def test_non_loopback_without_keys_refuses_to_start(host, keys, allow, refused):
    s = Settings(api_host=host, api_keys=keys, api_allow_unauthenticated=allow)
    if refused:
        with pytest.raises(UnsafeConfiguration):
            refuse_open_unauthenticated(s)
    else:
        refuse_open_unauthenticated(s)
