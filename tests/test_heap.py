"""`collector_paused`: no cyclic collection inside, the collector as it was afterwards."""

from __future__ import annotations

import gc

import pytest

from app.heap import collector_paused


@pytest.fixture
def collections():
    started: list[int] = []

    def count(phase, info):
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(count)
    yield started
    gc.callbacks.remove(count)
    gc.enable()


def test_an_acyclic_tree_built_and_freed_inside_costs_no_collection_inside_or_after(collections):
    gc.collect()
    collections.clear()
    with collector_paused():
        tree = [{"col_values": [i, str(i), [i]]} for i in range(20_000)]  # ~28 thresholds' worth
        del tree
    assert gc.isenabled()
    assert [[i] for i in range(100)]  # a few allocations after: the count is back where it was
    assert collections == []


def test_cycles_made_inside_are_collected_later(collections):
    with collector_paused():
        ring: list = []
        ring.append(ring)
        del ring
        assert collections == []
    assert gc.collect() >= 1


def test_it_leaves_a_collector_someone_disabled_disabled_and_enables_it_after_an_error():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a refusal")
    assert gc.isenabled()
