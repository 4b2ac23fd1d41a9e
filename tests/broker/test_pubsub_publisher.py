"""Pub/Sub publisher helpers (`app.broker.pubsub.publisher`); publishing itself runs on
pstest in test_pubsub.py and test_contract.py."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from app.broker.pubsub.publisher import fit_attribute, retryable


def test_reasons_are_cut_to_the_attribute_limit_without_splitting_a_character():
    reason = "é" * 700  # 1,400 bytes
    cut = fit_attribute(reason)
    assert len(cut.encode()) <= 1024 and cut == "é" * 512
    assert fit_attribute("short") == "short"


def test_transient_publish_errors_are_retried_and_others_are_not():
    assert retryable(gexc.ServiceUnavailable("x")) and retryable(gexc.ResourceExhausted("x"))
    assert not retryable(gexc.PermissionDenied("x")) and not retryable(gexc.NotFound("x"))
