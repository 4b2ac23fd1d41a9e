"""The one line that makes `WAREHOUSE=memory` open the in-memory warehouse (tests only)."""

from app.warehouse.registry import register
from tests.support.memory_warehouse.warehouse import MemoryWarehouse

register("memory", MemoryWarehouse)
