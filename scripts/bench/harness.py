"""Process plumbing for the benchmarks: free ports, started servers, RSS sampling, wrk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
PY = sys.executable
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATA_DIR=str(data_dir),
        PYTHONPATH=str(ROOT),  # the servers import app and scripts.bench.* from this tree
        API_HOST="127.0.0.1",
        SUBSCRIBER_HOST="127.0.0.1",
    )
    env.update(extra)
    return env


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path, healthy: bool = True) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(name, proc, port, log_path)
    if healthy:
        server.wait_healthy()
    return server


def start_uvicorn_app(name: str, module_app: str, env: dict[str, str], log_dir: Path) -> Server:
    port = free_port()
    argv = [PY, "-m", "uvicorn", module_app, "--host", "127.0.0.1", "--port", str(port), *UVICORN_FLAGS]
    return start(name, argv, env, port, log_dir)


def start_api(env: dict[str, str], log_dir: Path, name: str = "api") -> Server:
    port = free_port()
    env = {**env, "API_PORT": str(port)}
    return start(name, [PY, "-m", "app", "api"], env, port, log_dir)


def start_subscriber(env: dict[str, str], log_dir: Path, healthy: bool = True) -> Server:
    port = free_port()
    env = {**env, "SUBSCRIBER_PORT": str(port)}
    return start("subscriber", [PY, "-m", "app", "subscriber"], env, port, log_dir, healthy=healthy)


class RssSampler:
    """Peak RSS of a process and its children (summed), sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / (1024 * 1024)


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int
    raw: str = field(repr=False, default="")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, body_path: Path, connections: int, seconds: float, threads: int = 1) -> WrkResult:
    """Closed-loop load from wrk (separate process, bounded by `seconds`)."""
    env = {**os.environ, "BENCH_BODY": str(body_path)}
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(seconds)))}s", "--latency",
        "--timeout", "10s", "-s", str(BENCH_DIR / "post.lua"), url + "/api-log/v1/",
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests_per_s=rps,
        p50_ms=_ms(dist["50"]),
        p99_ms=_ms(dist["99"]),
        requests=total,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(x) for x in errs.groups()) if errs else 0,
        raw=out,
    )
