"""Run the BigQuery emulator (`bqemulator` from PyPI) for tests.

`running_bqemulator()` starts `bqemulator start` (through `bqemulator_main.py`, which gives
its gRPC handlers as many threads as Google has room for connections) on two free ports
(REST and Storage Read/Write gRPC), in-memory, with its working directory and data dir
in a temp dir, waits until both ports answer, yields a `BqEmulator` (rest "host:port",
grpc "host:port", project) and kills the process afterwards. The venv is built with
`scripts/emulators/setup_bqemulator.sh` when missing (pins in
`requirements-bqemulator.txt`, its own venv because its dependencies differ from the
app's).

If it cannot be built or started: with `CI=true` that is an error (the suite must not go
green by skipping), otherwise the calling test is skipped with the reason.

`shared_emulator()` puts a `BigQueryRestProxy` in front of it: its `rest` is the
proxy, which answers in Google's shape where the emulator departs from it and sends one
call at a time (see `fault_proxy/bq_shape.py`), and its `grpc` a `SerialGrpcProxy` that
shares that one-at-a-time baton, so the app runs Google's code path. A test that starts
its own emulator puts the same two proxies in front of it.

What the proxy cannot fix (bqemulator 1.4.0): BIGNUMERIC columns cannot be created
(DuckDB's DECIMAL stops at 38 digits), so warehouses on the emulator take the one
declared test-only override `EMULATOR_TYPE_OVERRIDES` (bignumeric in a STRING column as
canonical decimal text, exact like DuckDB).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from app.warehouse.bigquery.types import BigQueryType, TypeOverride, TypeOverrides

if TYPE_CHECKING:
    from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("BQEMULATOR_VENV", ROOT / ".venv-bqemulator"))
LAUNCHER = Path(__file__).with_name("bqemulator_main.py")  # its command line, with threads for open streams
BINARY = VENV / "bin" / "bqemulator"
SETUP_SCRIPT = ROOT / "scripts" / "emulators" / "setup_bqemulator.sh"
REQUIREMENTS = ROOT / "requirements-bqemulator.txt"
START_TIMEOUT = 60.0
PROJECT = "emulator-project"


# canonical decimal text in a STRING column; deletes compare it as text
EMULATOR_TYPE_OVERRIDES: TypeOverrides = {"bignumeric": TypeOverride("STRING", BigQueryType(None, "STRING"))}


class EmulatorUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class BqEmulator:
    rest: str  # "host:port" of the REST API (settings.bigquery_emulator_host); shared: the proxy
    grpc: str  # "host:port" of Storage Read/Write (settings.bigquery_emulator_grpc_host)
    project: str
    log_path: Path

    def settings(self, data_dir: Path, dataset_prefix: str, **overrides: Any) -> "Settings":
        """Settings of a BigQuery deployment on this emulator, in a fresh dataset."""
        from app.settings import Settings

        return Settings(
            data_dir=data_dir, warehouse="bigquery", gcp_project=self.project,
            bigquery_dataset=dataset_prefix + uuid.uuid4().hex[:12], bigquery_emulator_host=self.rest,
            bigquery_emulator_grpc_host=self.grpc, **overrides,
        )  # fmt: skip


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Fail loudly in CI, skip the test elsewhere."""
    if in_ci():
        raise EmulatorUnavailable(f"bqemulator unavailable (CI=true, not skipping): {reason}")
    import pytest

    pytest.skip(f"bqemulator unavailable: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def ensure_venv() -> Path:
    """Build the emulator's venv when missing or when its pins changed; return the binary."""
    stamp = VENV / ".requirements-bqemulator.sha256"
    if BINARY.exists() and stamp.exists():
        import hashlib

        if stamp.read_text().strip() == hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest():
            return BINARY
    try:
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT), str(VENV)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorUnavailable(f"setting up bqemulator failed: {exc}") from exc
    if proc.returncode != 0 or not BINARY.exists():
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        raise EmulatorUnavailable(f"setup_bqemulator.sh exited {proc.returncode}: {tail}")
    return BINARY


@contextlib.contextmanager
def running_bqemulator(project: str = PROJECT) -> Iterator[BqEmulator]:
    try:
        binary = ensure_venv()
    except EmulatorUnavailable as exc:
        unavailable(str(exc))
        raise  # unreachable: unavailable() raised or skipped
    with tempfile.TemporaryDirectory(prefix="bqemulator-") as tmp:
        tmp_path = Path(tmp)
        log_path = tmp_path / "bqemulator.log"
        rest_port, grpc_port = _free_port(), _free_port()
        # No inherited BQEMU_* variables, and a cwd without a stray .bqemu.toml.
        env = {k: v for k, v in os.environ.items() if not k.startswith("BQEMU_")}
        cmd = [
            str(binary.parent / "python"), "-P", str(LAUNCHER), "start",  # -P: not its folder, where bqemulator.py would shadow the package
            "--rest-host", "127.0.0.1", "--rest-port", str(rest_port),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--project", project, "--ephemeral",
            "--log-level", "warning", "--log-format", "console",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (_port_open(rest_port) and _port_open(grpc_port) and _rest_ready(rest_port, project)):
                if proc.poll() is not None:
                    unavailable(f"exited with {proc.returncode} at start: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    unavailable(f"not ready after {START_TIMEOUT}s: {_tail(log_path)}")
                time.sleep(0.1)
            yield BqEmulator(f"127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}", project, log_path)
        finally:
            _stop(proc)


@contextlib.contextmanager
def proxied_bqemulator(project: str = PROJECT) -> Iterator[BqEmulator]:
    """`running_bqemulator` behind the Google-shape REST proxy and the `SerialGrpcProxy`:
    `rest` and `grpc` are the proxies' addresses."""
    from tests.support.fault_proxy.rest import BigQueryRestProxy
    from tests.support.fault_proxy.serial_grpc import SerialGrpcProxy

    with running_bqemulator(project) as emu, BigQueryRestProxy(emu.rest) as rest, SerialGrpcProxy(emu.grpc) as grpc:
        yield BqEmulator(rest.address, grpc.address, emu.project, emu.log_path)


def _rest_ready(port: int, project: str) -> bool:
    import urllib.request

    try:
        url = f"http://127.0.0.1:{port}/bigquery/v2/projects/{project}/datasets"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


_SHARED: BqEmulator | None = None
_SHARED_CM: contextlib.AbstractContextManager | None = None
_FAILED: str | None = None


def shared_emulator() -> BqEmulator:
    """One emulator for the whole test session (started on first use, stopped at exit).

    Tests share it safely by using fresh table (or dataset) names.
    """
    global _SHARED, _SHARED_CM, _FAILED
    if _FAILED is not None:
        unavailable(_FAILED)  # do not retry a start that already failed this session
    if _SHARED is None:
        import atexit

        import pytest

        cm = proxied_bqemulator()
        try:
            emu = cm.__enter__()  # skips / raises like running_bqemulator
        except (EmulatorUnavailable, pytest.skip.Exception) as exc:
            _FAILED = str(exc)
            raise
        _SHARED, _SHARED_CM = emu, cm
        atexit.register(_stop_shared)
    return _SHARED


def _stop_shared() -> None:
    global _SHARED, _SHARED_CM
    if _SHARED_CM is not None:
        cm, _SHARED_CM, _SHARED = _SHARED_CM, None, None
        with contextlib.suppress(Exception):
            cm.__exit__(None, None, None)
