"""Opening the DuckDB file: settings, the spatial extension, no access to other files.

The file lock is DuckDB's own: one read-write process at a time; read-only openings
fail while it is held (see `errors.opening_failed`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import duckdb

log = logging.getLogger("app.warehouse.duckdb")


def spatial_extension_path() -> Path | None:
    try:
        import duckdb_extension_spatial
    except ImportError:
        return None
    path = (
        Path(duckdb_extension_spatial.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "spatial.duckdb_extension"
    )
    return path if path.exists() else None


def load_spatial(con: duckdb.DuckDBPyConnection) -> tuple[bool, str]:
    """Load spatial offline: LOAD (already installed), else INSTALL from the wheel, else LOAD the file."""
    path = spatial_extension_path()
    attempts: list[Callable[[], None]] = [lambda: con.execute("LOAD spatial")]
    if path is not None:
        literal = "'" + str(path).replace("'", "''") + "'"
        attempts.append(lambda: (con.execute(f"INSTALL {literal}"), con.execute("LOAD spatial")))
        attempts.append(lambda: con.execute(f"LOAD {literal}"))
    last = "duckdb_extension_spatial is not installed"
    for attempt in attempts:
        try:
            attempt()
            return True, "spatial loaded"
        except duckdb.Error as exc:
            last = str(exc)
    return False, last


def _has_geometry_columns(con: duckdb.DuckDBPyConnection) -> bool:
    # GEOMETRY is a core type in DuckDB 1.5: the catalog reads without the extension.
    return con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE starts_with(data_type, 'GEOMETRY')"
    ).fetchone()[0] > 0


def _spatial_installed(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'").fetchone()
    return bool(row and row[0])


def open_connection(
    path: Path,
    read_only: bool,
    memory_limit: str | None = None,
    spatial: bool | None = None,
    threads: int | None = None,
    block_size: int | None = None,
    storage_version: str | None = None,
) -> tuple[duckdb.DuckDBPyConnection, bool | None]:
    """Connect; load spatial if `spatial`, or (None) if some table has a GEOMETRY column.

    Returns the connection and whether spatial loaded: True, False (unavailable), or None
    (not needed, but available). It cannot be loaded later on this connection: loading is
    external access, switched off here.
    """
    # Both apply only when this call creates the file; an existing file keeps the block
    # size and format in its header. Small blocks and a format from v1.2 on keep far less
    # memory per table: a checkpoint writes a block per column segment, and opening
    # 10,000 tables holds 101 MB instead of 215-267 MB (docs/benchmarks.md, issue 20).
    config = {}
    if block_size:
        config["default_block_size"] = str(block_size)
    if storage_version:
        config["storage_compatibility_version"] = storage_version
    con = duckdb.connect(str(path), read_only=read_only, config=config)
    loaded: bool | None = None
    try:
        if memory_limit:
            # DuckDB's buffer pool defaults to 80% of RAM; the subscriber streams batches
            # and needs little, so cap it (bigger work spills to a temp file instead).
            con.execute(f"SET memory_limit = '{memory_limit_literal(memory_limit)}'")
        if threads:
            # The subscriber's appends are too small to gain from parallel workers, which
            # compete with its own threads and each keep buffers (see DUCKDB_THREADS).
            con.execute(f"SET threads = {int(threads)}")
        # Loading costs ~0.3 s and memory: only when a geography column exists or arrives.
        if spatial or (spatial is None and _has_geometry_columns(con)):
            loaded, detail = load_spatial(con)
            if not loaded:
                log.warning("DuckDB spatial extension unavailable (%s): geography stored as WKT text", detail)
        elif spatial_extension_path() is None and not _spatial_installed(con):
            loaded = False
        con.execute("SET TimeZone = 'UTC'")
        # Queries can reach the file system through table functions (read_csv, COPY
        # sources, ATTACH); the warehouse never needs that, so switch it off.
        con.execute("SET enable_external_access = false")
    except BaseException:
        con.close()
        raise
    return con, loaded


def memory_limit_literal(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", value.strip(), flags=re.I):
        raise ValueError(f"DUCKDB_MEMORY_LIMIT must look like 256MB, got {value!r}")
    return value.strip()
