#!/usr/bin/env bash
# Prepares the Google Cloud emulators used by the tests. Idempotent.
# pstest needs Debian's golang-go and golang-google-cloud-dev (make test installs them:
# scripts/setup_system.sh);
# where they are missing outside CI the emulator tests skip, in CI they fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
if command -v go >/dev/null && [ -d /usr/share/gocode/src/cloud.google.com/go/pubsub/pstest ]; then
  bash scripts/emulators/build_pstest.sh
else
  echo "setup: Go or golang-google-cloud-dev missing; pstest not built (apt-get install -y golang-go golang-google-cloud-dev)" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
fi
bash scripts/emulators/setup_bqemulator.sh
