"""API keys: `API_KEYS` holds plain keys or `sha256:<hex>` digests; requests carry one.

Keys are compared as SHA-256 digests in constant time (`app.keys.ring`), so config can
hold digests only. Scoped keys from `API_KEYS_FILE` join them there (`app.api.keys`).
"""

from __future__ import annotations

import hashlib


def parse_api_keys(raw: str | None) -> list[bytes]:
    """Digests of the configured keys; empty when authentication is off."""
    digests: list[bytes] = []
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower().startswith("sha256:"):
            hex_digest = item[len("sha256:"):]
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                raise ValueError("API_KEYS: a sha256: entry must be followed by 64 hex digits") from None
            if len(digest) != 32:
                raise ValueError("API_KEYS: a sha256: entry must be followed by 64 hex digits")
            digests.append(digest)
        else:
            digests.append(hashlib.sha256(item.encode()).digest())
    return digests


def request_headers(scope: dict) -> dict[bytes, bytes]:
    """A request's raw headers by (lowercase) name, read in one pass; the first of a repeated one wins."""
    raw = scope["headers"]
    return dict(reversed(raw if isinstance(raw, list) else list(raw)))
