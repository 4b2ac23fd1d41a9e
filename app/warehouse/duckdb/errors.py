"""The one translation of DuckDB's errors, by exception class.

Lock, disk and connection errors say nothing about the data: transient, retry the same
messages later. Anything else failing an apply (e.g. a value DuckDB refuses) is
terminal: the subscriber narrows it down to the message and dead-letters it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import duckdb

from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError, WarehouseLocked, WarehouseQueryError

_TRANSIENT = (
    duckdb.IOException,
    duckdb.FatalException,
    duckdb.ConnectionException,
    duckdb.TransactionException,
    duckdb.OutOfMemoryException,
    TransientWarehouseError,
)
# After these the connection is not trusted, or holds memory only closing it frees (rows
# not checkpointed cannot be evicted; a commit failing to pin a block is a TransactionException):
# reconnect on the next apply.
_CONNECTION_LOST = (
    duckdb.IOException,
    duckdb.FatalException,
    duckdb.ConnectionException,
    duckdb.OutOfMemoryException,
    duckdb.TransactionException,
)


class DuckDBFileLocked(WarehouseLocked):
    """A read-only opening failed: a writer (the subscriber) holds the file's lock."""


def apply_failed(exc: Exception, table: str) -> tuple[Exception, bool]:
    """The error an apply raises for `exc` (everything was rolled back), and whether to reconnect."""
    message = f"DuckDB apply to {table} failed, rolled back: {type(exc).__name__}: {exc}"
    if isinstance(exc, _TRANSIENT):
        return TransientWarehouseError(message), isinstance(exc, _CONNECTION_LOST)
    return TerminalWarehouseError(message), False


def _locked_by_another_process(path: Path) -> bool:
    """Whether another process holds a write lock on `path` (DuckDB's writer takes one).

    DuckDB reports a held lock as a plain IOException, so ask the OS: a shared lock is
    refused exactly then. Probing releases this process's own locks on the file when
    the descriptor closes, but this runs only after DuckDB refused to open it here, so
    no connection of this process holds it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def opening_failed(path: Path, exc: duckdb.Error) -> WarehouseQueryError:
    """What a read-only opening of `path` raises for `exc`."""
    if isinstance(exc, duckdb.IOException) and _locked_by_another_process(path):
        return DuckDBFileLocked(
            f"{path} is locked by another process (a running subscriber); "
            f"query through the subscriber's admin port instead ({exc})"
        )
    return WarehouseQueryError(f"cannot open {path}: {exc}")
