"""Random ids (batch ids, request ids) drawn from a per-thread pool of kernel random bytes.

`os.urandom` lets go of the GIL for its system call. On the API's event loop that was twice a
request: each time the broker's writer or the receipts thread took the GIL, and the loop then
waited for it back (py-spy: ~10% of the loop's samples on those two lines at 32 connections).
One `os.urandom` per 256 ids keeps the ids just as random (kernel CSPRNG bytes, each used once).
"""

from __future__ import annotations

import os
import threading
import time

_POOL_BYTES = 4096
_ID_BYTES = 16


class _Pool(threading.local):
    data = b""
    position = 0


_pool = _Pool()


def random_hex_id() -> str:
    """128 random bits as 32 hex digits (like `uuid4().hex`)."""
    pool = _pool
    start = pool.position
    if start + _ID_BYTES > len(pool.data):
        pool.data = os.urandom(_POOL_BYTES)
        start = 0
    pool.position = start + _ID_BYTES
    return pool.data[start : start + _ID_BYTES].hex()


_TIMED_RANDOM_BYTES = 10  # 80 bits, the first nibble of which is the version digit


class _TimedPool(threading.local):
    data = b""
    position = 0


_timed_pool = _TimedPool()


def _timed_random_bytes() -> bytes:
    """Pool bytes whose every 10-byte chunk begins with the nibble 7."""
    data = bytearray(os.urandom(_POOL_BYTES - _POOL_BYTES % _TIMED_RANDOM_BYTES))
    data[::_TIMED_RANDOM_BYTES] = bytes(0x70 | (b & 0x0F) for b in data[::_TIMED_RANDOM_BYTES])
    return bytes(data)


def timed_hex_id() -> str:
    """32 hex digits that begin with the time: 12 of milliseconds since the epoch, a `7`
    (which tells such an id from others, as UUIDv7's version digit does), then 76 random
    bits. Receipts stores find a batch by its time (`app.receipts.base.batch_time`)."""
    pool = _timed_pool
    start = pool.position
    if start + _TIMED_RANDOM_BYTES > len(pool.data):
        pool.data = _timed_random_bytes()
        start = 0
    pool.position = start + _TIMED_RANDOM_BYTES
    return (int(time.time() * 1000).to_bytes(6, "big") + pool.data[start : start + _TIMED_RANDOM_BYTES]).hex()


def _forget_pool() -> None:
    # A forked child must not hand out the ids its parent will also hand out.
    _pool.data = b""
    _pool.position = 0
    _timed_pool.data = b""
    _timed_pool.position = 0


os.register_at_fork(after_in_child=_forget_pool)
