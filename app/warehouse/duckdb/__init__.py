"""DuckDB warehouse, split by role (as dlt splits a destination):

- `types.py`: the type mapper (activity type <-> column type, how values are written
  and compared);
- `connection.py`: opening the file, its lock, the spatial extension;
- `errors.py`: the one translation of errors into transient / terminal / locked;
- `catalog.py`: bookkeeping tables, user tables, schemas, row counts;
- `apply.py`: the writer, the statements of one apply;
- `reads.py`: read-only queries, and `DuckDBFileReader` (the file opened read-only);
- `warehouse.py`: `DuckDBWarehouse`, connection and transaction of an apply.
"""

from app.warehouse.duckdb.capabilities import duckdb_capabilities
from app.warehouse.duckdb.catalog import APPLIED_TABLE, COLUMNS_TABLE, quote_ident
from app.warehouse.duckdb.errors import DuckDBFileLocked
from app.warehouse.duckdb.reads import DuckDBFileReader, query_file, table_schema_file
from app.warehouse.duckdb.types import COLUMN_TYPES, TYPE_MAPPER, DuckType, duck_types
from app.warehouse.duckdb.warehouse import REDELIVERY_WINDOW_DAYS, DuckDBWarehouse

__all__ = [
    "APPLIED_TABLE",
    "COLUMNS_TABLE",
    "COLUMN_TYPES",
    "REDELIVERY_WINDOW_DAYS",
    "TYPE_MAPPER",
    "DuckDBFileLocked",
    "DuckDBFileReader",
    "DuckDBWarehouse",
    "DuckType",
    "duck_types",
    "duckdb_capabilities",
    "query_file",
    "quote_ident",
    "table_schema_file",
]
