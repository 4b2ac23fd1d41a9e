# Quick start: `make run` (API + subscriber on the embedded default), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run api subscriber system system-bench test test-fast emulators bench reliability provision clean

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

# Debian packages for the whole suite (Go + Google Cloud Go sources for pstest, chromium
# for the browser test): installed when running as root, else the exact command is printed.
system:
	bash scripts/setup_system.sh test

system-bench:
	bash scripts/setup_system.sh bench

# Emulators for the Google Cloud path: pstest (built with Debian's golang-go and
# golang-google-cloud-dev) and bqemulator (own venv, from PyPI).
emulators: $(VENV)/.dev
	bash scripts/emulators/setup.sh

# `system` first: it may install python3-venv, which creating .venv needs.
test: system $(VENV)/.dev emulators
	$(PY) -m pytest

# Without the emulator-backed and slow end-to-end tests.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not emulator and not slow"

# The load generator is Debian's wrk (installed by system-bench like the test packages).
bench: system-bench $(VENV)/.dev emulators
	$(PY) -m scripts.bench

reliability: system $(VENV)/.dev emulators
	$(PY) -m scripts.reliability

provision: $(VENV)/.runtime
	bash pubsub.sh

clean:
	rm -rf data test-artifacts .emulators
