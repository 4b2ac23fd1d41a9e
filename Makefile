# Quick start: `make run` (API + subscriber on the embedded default), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run api subscriber test test-fast emulators bench reliability provision clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) -m app run

api: $(VENV)/.runtime
	$(PY) -m app api

subscriber: $(VENV)/.runtime
	$(PY) -m app subscriber

# Emulators for the Google Cloud path: pstest (needs Debian's golang-go and
# golang-google-cloud-dev, which .ci/run installs) and bqemulator (own venv, from PyPI).
emulators: $(VENV)/.dev
	bash scripts/emulators/setup.sh

test: $(VENV)/.dev emulators
	$(PY) -m pytest

# Without the emulator-backed and slow end-to-end tests.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not emulator and not slow"

# The load generator is Debian's wrk; install it when we can (root), else say how.
bench: $(VENV)/.dev emulators
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q wrk >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q wrk); } || { echo "bench: install wrk (apt-get install -y wrk)" >&2; exit 1; }
	$(PY) scripts/bench.py

reliability: $(VENV)/.dev emulators
	$(PY) scripts/reliability.py

provision: $(VENV)/.runtime
	bash pubsub.sh

clean:
	rm -rf data test-artifacts .emulators
