"""Tools run from the repo root as modules: `python -m scripts.bench`, `python -m scripts.reliability`."""
