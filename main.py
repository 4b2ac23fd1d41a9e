"""API entry point: `python main.py` (same as `python -m app api`)."""

from app.runtime import run_api

if __name__ == "__main__":
    run_api()
