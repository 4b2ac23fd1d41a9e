"""When the cyclic garbage collector runs on the request path.

A request's body becomes an acyclic tree of objects (dicts, lists, strings, numbers) that
reference counting frees as soon as the request lets go of it. The collector, which runs
every 700 allocations, would only walk that tree: ~10% of a 500-activity request's CPU
(docs/benchmarks.md, issue 20). Pausing it is the use `gc.disable` documents, for code
sure not to create cycles (https://docs.python.org/3/library/gc.html#gc.disable).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collection inside; synchronous code only (an `await` would pause it for other tasks too).

    Objects allocated inside and freed before the end leave the collector's allocation count
    where it was, so the tree costs no collection afterwards either.
    """
    if not gc.isenabled():  # someone else decided: leave it so
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
