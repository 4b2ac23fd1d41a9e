#!/usr/bin/env bash
# Build Google's Pub/Sub fake (pstest) into .emulators/pstest.
#
# Needs Debian's Go toolchain and Google Cloud Go sources:
#   apt-get install -y golang-go golang-google-cloud-dev
# Idempotent: does nothing when the binary is newer than its source.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$ROOT/tests/emulators/pstest/main.go"
OUT_DIR="$ROOT/.emulators"
OUT="$OUT_DIR/pstest"
GOCODE="${GOCODE:-/usr/share/gocode}"

if [[ -x "$OUT" && "$OUT" -nt "$SRC" && "${FORCE:-0}" != "1" ]]; then
  echo "pstest up to date: $OUT"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "error: 'go' not found; install with: apt-get install -y golang-go golang-google-cloud-dev" >&2
  exit 1
fi
if [[ ! -d "$GOCODE/src/cloud.google.com/go/pubsub/pstest" ]]; then
  echo "error: $GOCODE/src/cloud.google.com/go/pubsub/pstest missing; install with: apt-get install -y golang-google-cloud-dev" >&2
  exit 1
fi

# GOPATH mode: a throwaway workspace holding only our main package, Debian's sources after it.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src/pstestmain" "$OUT_DIR"
cp "$SRC" "$WORK/src/pstestmain/main.go"
(
  cd "$WORK/src/pstestmain"
  GO111MODULE=off GOFLAGS= GOPATH="$WORK:$GOCODE" GOCACHE="${GOCACHE:-$OUT_DIR/.gocache}" \
    go build -o "$OUT.tmp" .
)
mv -f "$OUT.tmp" "$OUT"
echo "built $OUT"
