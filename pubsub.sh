#!/usr/bin/env bash
# Provision the Google Cloud resources the pipeline uses (idempotent; safe to re-run):
#   Pub/Sub topic $PUBSUB_TOPIC, dead-letter topic "$PUBSUB_TOPIC-dead-letter" with subscription
#   "$PUBSUB_SUBSCRIPTION-dead-letter", subscription $PUBSUB_SUBSCRIPTION (ack deadline,
#   message ordering, dead-letter + retry policy), and BigQuery dataset $BIGQUERY_DATASET.
#
# Usage:
#   Google Cloud:  gcloud auth application-default login
#                  GCP_PROJECT=my-project ./pubsub.sh
#   Emulators:     PUBSUB_EMULATOR_HOST=127.0.0.1:8085 BIGQUERY_EMULATOR_HOST=127.0.0.1:9050 ./pubsub.sh
#   Pub/Sub only:  PROVISION_BIGQUERY=false ./pubsub.sh      (or: ./pubsub.sh --no-bigquery)
# Other settings (PUBSUB_TOPIC, PUBSUB_SUBSCRIPTION, BIGQUERY_DATASET, ACK_DEADLINE_SECONDS,
# MAX_DELIVERY_ATTEMPTS) are read from the environment like the API and subscriber do.
#
# On Google Cloud, dead-lettering also needs the Pub/Sub service agent to publish to the
# dead-letter topic and to subscribe to the main subscription, e.g.:
#   SA="service-$(gcloud projects describe "$GCP_PROJECT" --format='value(projectNumber)')@gcp-sa-pubsub.iam.gserviceaccount.com"
#   gcloud pubsub topics add-iam-policy-binding "${PUBSUB_TOPIC:-user-activities}-dead-letter" --member="serviceAccount:$SA" --role=roles/pubsub.publisher
#   gcloud pubsub subscriptions add-iam-policy-binding "${PUBSUB_SUBSCRIPTION:-user-activities-sub}" --member="serviceAccount:$SA" --role=roles/pubsub.subscriber
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
