"""Subscriber entry point: `python subscriber.py` (same as `python -m app subscriber`)."""

from app.runtime import run_subscriber

if __name__ == "__main__":
    run_subscriber()
