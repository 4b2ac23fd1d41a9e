"""A bounded map for per-table state (schemas, writers): least recently used dropped first.

The subscriber may see thousands of tables; what it keeps per table must not grow with
them (`TABLE_CACHE_SIZE`).
"""

from __future__ import annotations

import collections
from typing import Generic, Iterable, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def update(self, items: Iterable[tuple[K, V]]) -> None:
        for key, value in items:
            self[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
