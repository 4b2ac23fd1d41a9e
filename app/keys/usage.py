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
        # key id -> last use: written by the request path directly (a dict store, no call)
        self.last_used: dict[str, float] = {}
        self._saved: dict[str, float] = {}
        self._saved_at = float("-inf")

    def note(self, key_id: str, now: float) -> None:
        self.last_used[key_id] = now

    def save_if_due(self, now: float) -> None:
        if now - self._saved_at < SAVE_EVERY_SECONDS or self.last_used == self._saved:
            return
        self.save(now)

    def save(self, now: float) -> None:
        self._saved = dict(self.last_used)
        merged = {**read_usage(self.path), **self._saved}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(merged))
        os.replace(tmp, self.path)
        self._saved_at = now


def read_usage(path: Path) -> dict[str, float]:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}
