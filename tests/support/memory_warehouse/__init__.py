"""An in-memory warehouse: a real `Warehouse` (as httpx's MockTransport is a real transport)
for tests that need one without a file or an emulator, and the proof that a third
backend is one package plus one registry line (`registration.py`).
"""

from tests.support.memory_warehouse.warehouse import MemoryWarehouse

__all__ = ["MemoryWarehouse"]
