"""The bounded per-table cache: least recently used entries go first."""

from __future__ import annotations

import pytest

from app.warehouse.cache import LruCache


def test_the_least_recently_used_entry_is_dropped_beyond_capacity():
    cache: LruCache[str, int] = LruCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache["c"] = 3
    assert ("a" in cache, "b" in cache, "c" in cache, len(cache)) == (True, False, True, 2)


def test_update_and_clear():
    cache: LruCache[str, int] = LruCache(3)
    cache.update([("x", 1), ("y", 2), ("z", 3), ("w", 4)])
    assert [k in cache for k in "xyzw"] == [False, True, True, True]
    cache.clear()
    assert len(cache) == 0 and cache.get("y") is None


def test_a_cache_holds_at_least_one_entry():
    with pytest.raises(ValueError):
        LruCache(0)
