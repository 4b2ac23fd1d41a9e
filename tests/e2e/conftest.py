from __future__ import annotations

import pytest

from tests.support.processes import Pipeline


@pytest.fixture
def pipeline(tmp_path):
    """A fresh data dir with the API and the subscriber running as real processes."""
    p = Pipeline.create(tmp_path)
    p.start("subscriber")
    p.start("api")
    yield p
    p.stop()
