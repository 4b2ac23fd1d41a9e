"""Fixtures for the broker tests: a session-wide Pub/Sub emulator (Google's pstest)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.local_broker import broker, make_broker  # noqa: F401  (local broker fixtures)
from tests.support.pstest import running_pstest


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[str]:
    """host:port of a running pstest, exported as PUBSUB_EMULATOR_HOST for the session.

    Skips when pstest cannot be built or started, except with CI=true where it fails.
    """
    with running_pstest() as address, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", address)
        yield address
