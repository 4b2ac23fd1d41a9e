"""What the DuckDB backend can do, as data."""

from __future__ import annotations

from app.warehouse.base import Capabilities


def duckdb_capabilities(spatial: bool) -> Capabilities:
    """`spatial`: geography is GEOMETRY (else WKT text)."""
    return Capabilities(
        name="duckdb",
        transactional=True,
        max_alters_per_statement=1,
        supports_geometry=spatial,
        concurrent_tables=False,  # one connection, not thread-safe
    )
