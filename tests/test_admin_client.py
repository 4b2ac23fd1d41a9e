"""The admin port's URL: what a tool or the status page connects to."""

from __future__ import annotations

import pytest

from app.admin_client import admin_url, url_host
from app.settings import Settings


@pytest.mark.parametrize(
    "host, expected",
    [
        ("127.0.0.1", "http://127.0.0.1:8788/stats"),
        ("subscriber.internal", "http://subscriber.internal:8788/stats"),
        ("::1", "http://[::1]:8788/stats"),
        ("fe80::1%eth0", "http://[fe80::1%eth0]:8788/stats"),
        ("[::1]", "http://[::1]:8788/stats"),
        # a wildcard bind is reached through loopback
        ("0.0.0.0", "http://127.0.0.1:8788/stats"),
        ("::", "http://127.0.0.1:8788/stats"),
    ],
)
def test_admin_url(host, expected):
    assert admin_url(Settings(subscriber_host=host, subscriber_port=8788), "/stats") == expected


def test_url_host_brackets_only_ipv6_literals():
    assert [url_host(h) for h in ("0.0.0.0", "localhost", "::", "2001:db8::7")] == [
        "0.0.0.0", "localhost", "[::]", "[2001:db8::7]",
    ]
