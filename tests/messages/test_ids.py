"""Random ids from the per-thread pool: 128 bits each, never repeated, not shared with a fork."""

from __future__ import annotations

import os
import threading

from app.messages import ids
from app.messages.codec import new_batch_id


def test_ids_are_32_hex_digits_and_distinct_across_pool_refills():
    drawn = [ids.random_hex_id() for _ in range(3 * ids._POOL_BYTES // ids._ID_BYTES + 7)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_threads_draw_distinct_ids():
    per_thread: list[list[str]] = [[] for _ in range(4)]

    def draw(out: list[str]) -> None:
        out.extend(ids.random_hex_id() for _ in range(1000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for out in per_thread for i in out]
    assert len(set(everything)) == 4000


def test_a_forked_child_does_not_repeat_the_parents_next_ids():
    ids.random_hex_id()  # the pool is filled
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        os.write(write_end, ids.random_hex_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_next = [ids.random_hex_id() for _ in range(ids._POOL_BYTES // ids._ID_BYTES)]
    assert len(child_id) == 32 and child_id not in parent_next


def test_plain_batch_ids_are_random_and_keyed_ones_stable():
    assert new_batch_id(None) != new_batch_id(None)
    assert new_batch_id("key", "fp") == new_batch_id("key", "fp")
