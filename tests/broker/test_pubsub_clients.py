"""Pub/Sub client options and the readiness probe (`app.broker.pubsub.clients`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.api_core import exceptions as gexc
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from app.broker.pubsub.clients import client_kwargs, probe_permission
from app.settings import Settings

TOPIC = "projects/p/topics/t"


class FakeIam:
    def __init__(self, answer=None, error: Exception | None = None) -> None:
        self.answer, self.error, self.requests = answer, error, []

    def test_iam_permissions(self, request, timeout, retry):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return SimpleNamespace(permissions=self.answer)


def never_called():
    raise AssertionError("no metadata get on Google Cloud")


def test_ready_when_iam_grants_the_permission_the_process_needs():
    iam = FakeIam(answer=["pubsub.topics.publish"])
    assert probe_permission(iam, TOPIC, "pubsub.topics.publish", never_called) == (True, "ok")
    assert iam.requests == [{"resource": TOPIC, "permissions": ["pubsub.topics.publish"]}]


def test_not_ready_when_the_topic_is_missing_or_the_permission_is_not_granted():
    ok, reason = probe_permission(FakeIam(answer=[]), TOPIC, "pubsub.topics.publish", never_called)
    assert not ok and reason == f"{TOPIC} does not exist or this identity lacks pubsub.topics.publish"


def test_permission_denied_means_unknown_not_down():
    ok, reason = probe_permission(
        FakeIam(error=gexc.PermissionDenied("caller lacks iam")), TOPIC, "pubsub.topics.publish", never_called
    )
    assert ok and reason.startswith("unknown: not allowed to check")


def test_unreachable_is_not_ready():
    ok, reason = probe_permission(FakeIam(error=gexc.ServiceUnavailable("down")), TOPIC, "x", never_called)
    assert not ok and "ServiceUnavailable" in reason


@pytest.mark.parametrize(
    "get_error, expected",
    [(None, (True, "ok")), (gexc.NotFound("nope"), (False, f"{TOPIC} does not exist")),
     (gexc.PermissionDenied("no get"), (True, "unknown: not allowed to check projects/p/topics/t (no get)"))],
)
def test_emulators_without_iam_fall_back_to_a_get(get_error, expected):
    def get():
        if get_error is not None:
            raise get_error

    iam = FakeIam(error=gexc.MethodNotImplemented("unknown service google.iam.v1.IAMPolicy"))
    assert probe_permission(iam, TOPIC, "pubsub.topics.publish", get) == expected


def test_locational_endpoint_goes_to_the_client_options(monkeypatch):
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    settings = Settings(pubsub_endpoint="us-east1-pubsub.googleapis.com:443")
    assert client_kwargs(settings, SubscriberGrpcTransport) == {
        "client_options": {"api_endpoint": "us-east1-pubsub.googleapis.com:443"}
    }
    assert client_kwargs(Settings(), SubscriberGrpcTransport) == {}


def test_the_emulator_wins_over_an_endpoint(monkeypatch):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    kwargs = client_kwargs(Settings(pubsub_endpoint="us-east1-pubsub.googleapis.com:443"), SubscriberGrpcTransport)
    assert isinstance(kwargs["transport"], SubscriberGrpcTransport)
    kwargs["transport"].close()
