#!/usr/bin/env bash
# Provision the Google Cloud resources the pipeline uses (idempotent; safe to re-run):
#   Pub/Sub topic $PUBSUB_TOPIC, dead-letter topic "$PUBSUB_TOPIC-dead-letter" with subscription
#   "$PUBSUB_SUBSCRIPTION-dead-letter" (never expires, keeps dead letters 7 days), subscription
#   $PUBSUB_SUBSCRIPTION (never expires, ack deadline, message ordering, retry policy, dead-letter
#   policy with $PUBSUB_MAX_DELIVERY_ATTEMPTS), the Pub/Sub service agent's roles for
#   dead-lettering, and BigQuery dataset $BIGQUERY_DATASET in $BIGQUERY_LOCATION.
#
# Usage:
#   Google Cloud:  gcloud auth application-default login
#                  GCP_PROJECT=my-project GCP_PROJECT_NUMBER=123456789012 ./pubsub.sh
#   Emulators:     PUBSUB_EMULATOR_HOST=127.0.0.1:8085 BIGQUERY_EMULATOR_HOST=127.0.0.1:9050 ./pubsub.sh
#   Pub/Sub only:  PROVISION_BIGQUERY=false ./pubsub.sh      (or: ./pubsub.sh --no-bigquery)
# Other settings (PUBSUB_TOPIC, PUBSUB_SUBSCRIPTION, BIGQUERY_DATASET, ACK_DEADLINE_SECONDS, ...)
# are read from the environment like the API and subscriber do.
#
# Drifted subscription fields are updated in place. Whatever cannot be done (message ordering
# on an existing subscription, a dataset in another location, an IAM grant without
# GCP_PROJECT_NUMBER or without setIamPolicy rights) is listed under "NOT DONE" with the
# exact gcloud command to run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

case "${1:-}" in
  -h|--help)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac

if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
else
  PYTHON="$(command -v python3)"
fi

if [[ -z "${PUBSUB_EMULATOR_HOST:-}" && -z "${GCP_PROJECT:-}" ]]; then
  echo "error: GCP_PROJECT is required against Google Cloud (or set PUBSUB_EMULATOR_HOST for the emulator)." >&2
  echo "usage: GCP_PROJECT=my-project $0 [--no-bigquery]   (see $0 --help)" >&2
  exit 2
fi

echo "using $PYTHON; see '$0 --help' for options"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m app.provision "$@"
