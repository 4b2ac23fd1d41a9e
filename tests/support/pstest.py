"""Run Google's Pub/Sub fake (`pstest`, built from Debian's Go sources) for tests.

`running_pstest()` starts `.emulators/pstest` on a free port (building it with
`scripts/emulators/build_pstest.sh` if missing), waits until it accepts connections,
yields "host:port" and kills it afterwards.

If it cannot be built or started: with `CI=true` that is an error (the suite must not go
green by skipping), otherwise the calling test is skipped with the reason.

pstest quirks the tests must respect: subscriptions need an explicit
`ack_deadline_seconds` >= 10; delivery is slow (tens of messages per second); ordering
keys and dead-letter policies are stored but not enforced; `delivery_attempt` is not set.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / ".emulators" / "pstest"
SOURCE = ROOT / "tests" / "emulators" / "pstest" / "main.go"
BUILD_SCRIPT = ROOT / "scripts" / "emulators" / "build_pstest.sh"
START_TIMEOUT = 15.0


class EmulatorUnavailable(RuntimeError):
    pass


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Fail loudly in CI, skip the test elsewhere."""
    if in_ci():
        raise EmulatorUnavailable(f"pstest emulator unavailable (CI=true, not skipping): {reason}")
    import pytest

    pytest.skip(f"pstest emulator unavailable: {reason}")


def ensure_binary() -> Path:
    """Build the binary if it is missing or older than its source; return its path."""
    if BINARY.exists() and os.access(BINARY, os.X_OK) and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorUnavailable(f"building pstest failed: {exc}") from exc
    if proc.returncode != 0 or not BINARY.exists():
        raise EmulatorUnavailable(
            f"building pstest failed (exit {proc.returncode}); needs "
            f"`apt-get install -y golang-go golang-google-cloud-dev`:\n{proc.stdout}{proc.stderr}"
        )
    return BINARY


def _wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen) -> None:
    while True:
        if proc.poll() is not None:
            raise EmulatorUnavailable(f"pstest exited early with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EmulatorUnavailable(f"pstest did not accept connections on {host}:{port}") from None
            time.sleep(0.05)


def _read_address(proc: subprocess.Popen, deadline: float, errfile) -> str:
    """The binary prints 'listening on HOST:PORT' once bound (port 0 = any free port, no race)."""
    assert proc.stdout is not None
    result: list[str] = []

    def reader() -> None:
        line = proc.stdout.readline()
        result.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if not result or not result[0].startswith("listening on "):
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
        raise EmulatorUnavailable(f"pstest did not report its address: {result!r} {stderr}")
    return result[0].removeprefix("listening on ").strip()


@contextlib.contextmanager
def start_pstest(host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start pstest; yield ("host:port", process); raise EmulatorUnavailable on failure."""
    binary = ensure_binary()
    errfile = tempfile.TemporaryFile()  # a file, so a chatty emulator never blocks on a full pipe
    try:
        proc = subprocess.Popen(
            [str(binary), "-host", host, "-port", str(port)],
            stdout=subprocess.PIPE,
            stderr=errfile,
            text=True,
        )
    except OSError as exc:
        errfile.close()
        raise EmulatorUnavailable(f"cannot run {binary}: {exc}") from exc
    try:
        deadline = time.monotonic() + START_TIMEOUT
        address = _read_address(proc, deadline, errfile)
        h, _, p = address.rpartition(":")
        _wait_port(h, int(p), deadline, proc)
        yield address, proc
    finally:
        stop(proc)
        errfile.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def running_pstest() -> Iterator[str]:
    """Yield "host:port" of a fresh pstest; skip (or, with CI=true, fail) if it cannot start."""
    try:
        cm = start_pstest()
        address, _proc = cm.__enter__()
    except EmulatorUnavailable as exc:
        unavailable(str(exc))
        raise  # unreachable: unavailable() raises
    try:
        yield address
    finally:
        cm.__exit__(None, None, None)
