"""The tables file in force: read at start, read again when it changes, no restart.

A change that breaks the file keeps the last good version; the problem is logged once
per change and shown by `status()` (the `/readyz` detail). Looking for a change is one
`stat`, done at most every `check_seconds` (`TABLES_FILE_CHECK_SECONDS`): a `stat` per
request would cost more than the whole contract check. With 0, every call looks.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from app.contracts.file import TablesConfig, TablesFileInvalid, load

log = logging.getLogger("app.contracts")


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TablesFile:
    """The current `TablesConfig` of one file; `None` path: no file, no contracts."""

    def __init__(
        self, path: Path | None, check: Callable[[TablesConfig], None] | None = None, check_seconds: float = 0.0
    ) -> None:
        self.path = path
        self.check_seconds = check_seconds
        self._next_check = 0.0
        self._check = check  # what the file alone cannot tell (e.g. hmac needs a key); raises TablesFileInvalid
        self.config: TablesConfig | None = None
        self.problem: str | None = None
        self.loaded_at: float | None = None
        self._signature: tuple[int, int, int] | None = None
        self._stat_path = os.fspath(path) if path is not None else ""  # a str: stat per request, no Path conversion
        if path is not None:
            self._signature = _signature(self._stat_path)
            self.config = self._load(path)  # an invalid file is refused at start: TablesFileInvalid
            self.loaded_at = time.time()

    def current(self) -> TablesConfig | None:
        """The config in force, reloaded first if the file changed since the last call."""
        if self.path is None:
            return None
        if self.check_seconds:
            now = time.monotonic()
            if now < self._next_check:
                return self.config
            self._next_check = now + self.check_seconds
        signature = _signature(self._stat_path)
        if signature != self._signature:
            self._signature = signature
            self._reload()
        return self.config

    def _reload(self) -> None:
        assert self.path is not None
        try:
            if self._signature is None:
                raise TablesFileInvalid(str(self.path), 0, "the file is missing")
            config = self._load(self.path)
        except TablesFileInvalid as exc:
            self.problem = f"{exc}; keeping the version loaded at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.loaded_at or 0))}"
            log.warning("tables file not reloaded: %s", self.problem)
            return
        self.config, self.problem, self.loaded_at = config, None, time.time()
        log.info("tables file reloaded: %s", self.path)

    def _load(self, path: Path) -> TablesConfig:
        config = load(path)
        if self._check is not None:
            self._check(config)
        return config

    def status(self) -> dict[str, Any]:
        """The `/readyz` detail: which file is in force and whether its last change was refused."""
        self._next_check = 0.0  # look now: a probe is rare and wants the truth
        self.current()
        if self.path is None:
            return {"file": None}
        return {"file": str(self.path), "ok": self.problem is None, "problem": self.problem}


def tables_file_of(settings: Any) -> TablesFile:
    """The settings' tables file, checked against the settings too (hmac needs PII_HMAC_KEYS)."""
    from app.contracts.pii import parse_hmac_keys, require_keys_for

    keys = parse_hmac_keys(settings.pii_hmac_keys)
    return TablesFile(
        settings.tables_file, check=lambda config: require_keys_for(config, keys),
        check_seconds=settings.tables_file_check_seconds,
    )
