"""Scoped, rotatable API keys: the keys file, the live key ring, rate limits, last use.

- `entries`: one key's entry (`ApiKey`), read from and written to `API_KEYS_FILE` (TOML).
- `ring`: the keys the API accepts now (file plus `API_KEYS`), re-read when the file changes.
- `limiter`: a token bucket per key id.
- `usage`: when each key was last used, kept in `$DATA_DIR` for `keys list`.
"""

from app.keys.entries import ApiKey, KeysFileError, load_keys_file, new_key, write_keys_file
from app.keys.ring import KeyRing

__all__ = ["ApiKey", "KeyRing", "KeysFileError", "load_keys_file", "new_key", "write_keys_file"]
