#!/usr/bin/env bash
# Create (or refresh) the BigQuery emulator's own venv: .venv-bqemulator.
# Idempotent: a second run only re-checks the pins and the spatial extension.
# Usage: scripts/emulators/setup_bqemulator.sh [VENV_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${BQEMULATOR_VENV:-$ROOT/.venv-bqemulator}}"
REQ="$ROOT/requirements-bqemulator.txt"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_bqemulator: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.requirements-bqemulator.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x "$VENV/bin/bqemulator" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    echo "$WANT" > "$STAMP"
fi

# DuckDB's spatial extension from the wheel's file, so the emulator never downloads it.
"$VENV/bin/python" - <<'PY'
import pathlib, duckdb, duckdb_extension_spatial

base = pathlib.Path(duckdb_extension_spatial.__file__).parent
version = duckdb.__version__
files = sorted(base.glob(f"extensions/v{version}/spatial.duckdb_extension")) or sorted(
    base.glob("extensions/*/spatial.duckdb_extension")
)
if not files:
    raise SystemExit(f"setup_bqemulator: no spatial.duckdb_extension under {base}")
con = duckdb.connect()
installed = con.execute(
    "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'"
).fetchone()
if not (installed and installed[0]):
    con.execute(f"INSTALL '{files[0]}'")
con.execute("LOAD spatial")
print("setup_bqemulator: spatial extension ok")
PY
echo "setup_bqemulator: ready ($VENV/bin/bqemulator)" >&2
