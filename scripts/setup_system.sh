#!/usr/bin/env bash
# The Debian packages `make test` (and `make bench`) need, installed when missing.
#
#   python3-venv                        the project's venvs (only while .venv does not exist yet)
#   golang-go, golang-google-cloud-dev  build pstest, Google's Pub/Sub fake (scripts/emulators/)
#   chromium                            the status page's browser test
#   wrk                                 the load generator (bench only)
#
# As root: one `apt-get update`, then `apt-get install` of what is missing. Otherwise
# nothing is installed: it prints the exact command to run and exits 1.
# Usage: scripts/setup_system.sh [--dry-run] test|bench
#   --dry-run  print the decision (what is missing, what would run) without running it
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
purpose="${1:-test}"
GOCODE="${GOCODE:-/usr/share/gocode}"
PYTHON="${PYTHON:-python3}"

need=()
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c "import ensurepip" >/dev/null 2>&1; then
  need+=(python3-venv)
fi
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d "$GOCODE/src/cloud.google.com/go/pubsub/pstest" ] || need+=(golang-google-cloud-dev)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
if [ "$purpose" = "bench" ]; then
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi

if [ ${#need[@]} -eq 0 ]; then
  echo "setup_system: Debian packages for $purpose present"
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  echo "setup_system: missing Debian packages for make $purpose: ${need[*]}" >&2
  echo "run: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi

echo "setup_system: installing ${need[*]}"
if [ "$dry_run" = 1 ]; then
  echo "would run: apt-get update -q && apt-get install -y -q ${need[*]}"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${need[@]}"
