"""scripts/setup_system.sh decides what to install from what is present and who runs it.

Run against a PATH of stubs (go, chromium, wrk, id, apt-get), so nothing is installed or removed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import ROOT

EVERYTHING = ("go", "chromium", "wrk")


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(0o755)


def run_setup(tmp_path: Path, *args: str, present=EVERYTHING, uid: int = 0, python_has_venv: bool = True, pstest_sources=True):
    repo = tmp_path / "repo"  # a copy without .venv, so the python3-venv check applies
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup_system.sh", repo / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname",):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for tool in present:
        _stub(bin_dir, tool, "exit 0")
    _stub(bin_dir, "id", f"echo {uid}")
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {tmp_path / "apt.log"}')
    _stub(bin_dir, "python3", "exit 0" if python_has_venv else "exit 1")
    gocode = tmp_path / "gocode"
    if pstest_sources:
        (gocode / "src/cloud.google.com/go/pubsub/pstest").mkdir(parents=True, exist_ok=True)
    env = {"PATH": str(bin_dir), "GOCODE": str(gocode)}
    out = subprocess.run([shutil.which("bash"), str(repo / "scripts" / "setup_system.sh"), *args],
                         env=env, capture_output=True, text=True, timeout=30)
    log = tmp_path / "apt.log"
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_nothing_to_do_when_everything_is_there(tmp_path):
    out, apt = run_setup(tmp_path, "bench")
    assert out.returncode == 0 and "present" in out.stdout and apt == []


def test_root_installs_what_is_missing_after_one_update(tmp_path):
    out, apt = run_setup(tmp_path, "test", present=("wrk",), python_has_venv=False, pstest_sources=False)
    assert out.returncode == 0, out.stderr
    assert apt == ["apt-get update -q", "apt-get install -y -q python3-venv golang-go golang-google-cloud-dev chromium"]


def test_wrk_only_for_bench(tmp_path):
    out, apt = run_setup(tmp_path, "bench", present=("go", "chromium"))
    assert out.returncode == 0 and apt == ["apt-get update -q", "apt-get install -y -q wrk"]


def test_not_root_prints_the_exact_command_and_stops(tmp_path):
    out, apt = run_setup(tmp_path, "test", present=("go",), uid=1000)
    assert out.returncode == 1 and apt == []
    assert "run: sudo apt-get update && sudo apt-get install -y chromium" in out.stderr


@pytest.mark.parametrize("uid, code", [(0, 0), (1000, 1)])
def test_dry_run_installs_nothing(tmp_path, uid, code):
    out, apt = run_setup(tmp_path, "--dry-run", "test", present=(), uid=uid)
    assert out.returncode == code and apt == []
    if uid == 0:
        assert "would run: apt-get update -q && apt-get install -y -q golang-go chromium" in out.stdout
