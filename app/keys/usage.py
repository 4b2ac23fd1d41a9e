"""When each key was last used: noted in memory per request, saved every few seconds.

Saved to `$DATA_DIR/key_usage.json` (key ids and times only) for `keys list`, by the
API process; written whole and renamed, so a reader never sees half of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

SAVE_EVERY_SECONDS = 5.0


def usage_file(data_dir: Path) -> Path:
    return Path(data_dir) / "key_usage.json"


class UsageLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last_used: dict[str, float] = {}
        self._dirty = False
        self._saved_at = float("-inf")

    def note(self, key_id: str, now: float) -> None:
        self._last_used[key_id] = now
        self._dirty = True

    def save_if_due(self, now: float) -> None:
        if not self._dirty or now - self._saved_at < SAVE_EVERY_SECONDS:
            return
        self.save(now)

    def save(self, now: float) -> None:
        merged = {**read_usage(self.path), **self._last_used}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(merged))
        os.replace(tmp, self.path)
        self._dirty = False
        self._saved_at = now


def read_usage(path: Path) -> dict[str, float]:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}
