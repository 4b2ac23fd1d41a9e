"""The keys the API accepts right now: `API_KEYS` (every scope) plus `API_KEYS_FILE`.

The file is checked for a change (stat) at most once a second, from the request path,
so a revoked or disabled key stops working within about a second without a restart.
A file that cannot be read or parsed keeps the last good keys (and logs why).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from app.keys.entries import ApiKey, KeysFileError, load_keys_file
from app.keys.usage import UsageLog

log = logging.getLogger("app.keys")

CHECK_EVERY_SECONDS = 1.0
VERIFIED_SECRETS = 1024  # remembered matches: bounded, as the keys are


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key sent as `Authorization: Bearer <key>` or `X-API-Key`, from raw headers by lower-case name."""
    auth = headers.get(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1") or None
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key else None


class KeyRing:
    def __init__(
        self,
        env_keys: list[ApiKey],
        path: Path | None = None,
        usage: UsageLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        tally_of: Callable[[str], Any] | None = None,
    ) -> None:
        self.tally_of = tally_of  # key id -> its counts object, attached to each key (`ApiKey.tally`)
        self.env_keys = self._with_tallies(env_keys)
        self.path = Path(path) if path is not None else None
        self.usage = usage
        self.last_used: dict[str, float] = {} if usage is None else usage.last_used
        self.clock = clock
        self.wall_clock = wall_clock
        self._file_keys: list[ApiKey] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        if self.path is not None:
            self._file_keys = self._with_tallies(load_keys_file(self.path))  # a bad file at start-up is an error, not a warning
            self._signature = self._stat()
        self._checked_at = self.clock()
        self.keys: list[ApiKey] = [*env_keys, *self._file_keys]
        self._verified: dict[str, ApiKey] = {}  # secrets that matched a key of `keys`
        self._by_authorization: dict[bytes, ApiKey] = {}  # raw Authorization values that held one

    @property
    def enabled(self) -> bool:
        """Whether requests need a key (any key configured, or a keys file, even empty)."""
        return bool(self.env_keys) or self.path is not None

    def ids(self) -> list[str]:
        return [k.id for k in self.keys]

    def authenticate_request(self, headers: dict[bytes, bytes]) -> ApiKey | None:
        """The usable key a request presents (raw headers by lower-case name), else None.

        The key is sent as `Authorization: Bearer <key>` or `X-API-Key` (`presented_key`).
        A raw Authorization value whose secret matched is remembered too (bounded, forgotten
        on reload, as `authenticate` remembers secrets), so a known key costs one dict lookup
        of the header as sent, with no parsing. Flat on purpose: it runs on every request.
        """
        if self.clock() - self._checked_at >= CHECK_EVERY_SECONDS:
            self.refresh()
        found = self._by_authorization.get(headers.get(b"authorization"))  # type: ignore[arg-type]
        if found is None:
            found = self._match(presented_key(headers))
            if found is None:
                return None
            authorization = headers.get(b"authorization")
            if (authorization and authorization[:7].lower() == b"bearer "  # it held the secret (`presented_key`)
                    and len(self._by_authorization) < VERIFIED_SECRETS):
                self._by_authorization[authorization] = found
        now = self.wall_clock()
        if now >= found.usable_until:  # disabled or expired, checked on every request
            return None
        self.last_used[found.id] = now  # `usage`'s dict: saved every few seconds by `refresh`
        return found

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The usable key whose secret this is, else None."""
        if self.clock() - self._checked_at >= CHECK_EVERY_SECONDS:
            self.refresh()
        found = self._match(secret)
        return None if found is None else self._usable(found)

    def _usable(self, found: ApiKey) -> ApiKey | None:
        """`found` unless it is disabled or expired now (`authenticate_request` does this inline)."""
        now = self.wall_clock()
        if now >= found.usable_until:
            return None
        self.last_used[found.id] = now
        return found

    def _match(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is, usable or not.

        A secret not seen before is hashed and compared with every digest in constant
        time, with no early exit, so timing tells nothing about which matched. One that
        matched is remembered (up to VERIFIED_SECRETS, forgotten when the file changes):
        finding it again is a dict lookup, which compares the presented string with a
        remembered one only when their 64-bit keyed hashes (SipHash, a per-process random
        key) are equal, so its timing tells nothing about a secret either. Expiry and
        revocation are checked by the callers on every request all the same.
        """
        if secret is None:
            return None
        found = self._verified.get(secret)
        if found is None:
            candidate = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()  # as `digest_of`
            for key in self.keys:
                if hmac.compare_digest(candidate, key.digest):
                    found = key
            if found is not None and len(self._verified) < VERIFIED_SECRETS:
                self._verified[secret] = found
        return found

    def refresh(self) -> None:
        now = self.clock()
        if now - self._checked_at < CHECK_EVERY_SECONDS:
            return
        self._checked_at = now
        if self.usage is not None:
            self.usage.save_if_due(now)
        if self.path is None:
            return
        signature = self._stat()
        if signature == self._signature:
            return
        try:
            file_keys = self._with_tallies(load_keys_file(self.path))
        except KeysFileError as exc:
            log.error("keys file not reloaded, keeping the last good keys: %s", exc)
            self._signature = signature  # logged once per change, not per second
            return
        self._file_keys, self._signature = file_keys, signature
        self.keys = [*self.env_keys, *file_keys]
        # A revoked or disabled key is found again the slow way (a new ApiKey), and refused.
        self._verified, self._by_authorization = {}, {}
        log.info("keys file reloaded", extra={"keys": len(file_keys)})

    def _with_tallies(self, keys: list[ApiKey]) -> list[ApiKey]:
        if self.tally_of is not None:
            for key in keys:
                object.__setattr__(key, "tally", self.tally_of(key.id))  # frozen: set once, before use
        return keys

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)
