"""`make bench` (`python -m scripts.bench`) and the micro-benchmarks beside it (`python -m scripts.bench.<name>`)."""
