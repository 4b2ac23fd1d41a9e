"""What the DuckDB backend can do, as data."""

from __future__ import annotations

from app.warehouse.base import Capabilities

# Tables applied in one transaction: one dedup claim and one COMMIT (a WAL fsync) for
# all of them instead of one per table.
MAX_TABLES_PER_APPLY = 256


def duckdb_capabilities(spatial: bool) -> Capabilities:
    """`spatial`: geography is GEOMETRY (else WKT text)."""
    return Capabilities(
        transactional=True,
        max_alters_per_statement=1,
        supports_geometry=spatial,
        concurrent_tables=False,  # one connection, not thread-safe
        max_tables_per_apply=MAX_TABLES_PER_APPLY,
    )
