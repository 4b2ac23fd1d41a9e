"""Real API and subscriber processes for end-to-end tests, on free ports and a temp DATA_DIR."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the process may still be starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class Pipeline:
    """Both processes of the pipeline, started as a user would (`python -m app api|subscriber`)."""

    data_dir: Path
    env: dict[str, str]
    api_port: int
    admin_port: int
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def create(cls, tmp: Path, **env: str) -> "Pipeline":
        data_dir = tmp / "data"
        api_port, admin_port = free_port(), free_port()
        full_env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "SUBSCRIBER_HOST": "127.0.0.1",
            "SUBSCRIBER_PORT": str(admin_port),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        log_dir = tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir, full_env, api_port, admin_port, log_dir)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, which: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{which}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", which], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[which] = proc
        url = self.api_url if which == "api" else self.admin_url
        wait_until(lambda: self._healthy(proc, url), timeout=60, what=f"{which} to start (log: {self.log_dir})")
        return proc

    def _healthy(self, proc: subprocess.Popen, url: str) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}; see {self.log_dir}")
        return httpx.get(url + "/healthz", timeout=1).status_code == 200

    def kill(self, which: str, sig: int = signal.SIGKILL) -> int:
        proc = self.procs.pop(which)
        proc.send_signal(sig)
        return proc.wait(timeout=60)

    def stop(self) -> None:
        for which in list(self.procs):
            proc = self.procs[which]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.procs.pop(which)

    def post(self, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return httpx.post(self.api_url + "/api-log/v1/", json=body, headers=headers, timeout=30, **kw)

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        """Read through the subscriber's admin port (the way `python -m app query` does)."""
        r = httpx.post(self.admin_url + "/query", json={"sql": sql, "params": params or []}, timeout=30)
        assert r.status_code == 200, r.text
        return [tuple(row) for row in r.json()["rows"]]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.admin_url + "/stats", timeout=5).json()
