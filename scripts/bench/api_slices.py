"""README body x32 against bare FastAPI and one or more API versions, in interleaved slices.

All servers run at once; wrk loads each for a short slice in turn (order reversed every
other pass), many times. Background load on a shared machine changes slowly, so each
server sees about the same load and the ratio to bare is steadier than from separate
runs. Also prints CPU per request of each server process and of its main thread.

    .venv/bin/python -m scripts.bench.api_slices                       # this tree
    .venv/bin/python -m scripts.bench.api_slices --slices 16 /path/to/old/tree .
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import psutil

from scripts.bench import harness, workload


def _main_thread_cpu(proc: psutil.Process) -> float:
    return next(t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", default=[str(harness.ROOT)], help="source trees with a .venv")
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    trees = [Path(t).resolve() for t in args.trees]
    tmp = Path(tempfile.mkdtemp(prefix="api-slices-"))
    body = tmp / "readme.json"
    body.write_bytes(workload.readme_body())

    servers: dict[str, harness.Server] = {}
    names = ["bare"] + [f"{i}:{t.name}" for i, t in enumerate(trees)]
    try:
        servers["bare"] = harness.start_uvicorn_app("bare", "scripts.bench.bare_app:app", harness.base_env(tmp / "bare"), tmp / "logs")
        for name, tree in zip(names[1:], trees):
            port = harness.free_port()
            env = {**harness.base_env(tmp / name.replace(":", "-")), "API_PORT": str(port),
                   "PYTHONPATH": str(tree)}
            # -P: without it `-m` puts the working directory (this tree) first on sys.path,
            # and every server ran this tree's app whatever its PYTHONPATH said.
            servers[name] = harness.start(name.replace(":", "-"), [str(tree / ".venv/bin/python"), "-P", "-m", "app", "api"],
                                          env, port, tmp / "logs")
        for server in servers.values():
            harness.run_wrk(server.url, body, 32, 1)  # warm-up
        requests = dict.fromkeys(names, 0)
        cpu = dict.fromkeys(names, 0.0)
        main_cpu = dict.fromkeys(names, 0.0)
        rps: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.slices):
            for name in names if i % 2 == 0 else names[::-1]:
                proc = psutil.Process(servers[name].proc.pid)
                before, main_before = proc.cpu_times(), _main_thread_cpu(proc)
                r = harness.run_wrk(servers[name].url, body, 32, args.seconds)
                after = proc.cpu_times()
                if r.non_2xx or r.errors:
                    print(f"  warning: {name}: {r.non_2xx} non-2xx, {r.errors} socket errors")
                requests[name] += r.requests
                cpu[name] += (after.user + after.system) - (before.user + before.system)
                main_cpu[name] += _main_thread_cpu(proc) - main_before
                rps[name].append(r.requests_per_s)
            print(f"slice {i + 1}: " + " | ".join(f"{n} {rps[n][-1]:6.0f}" for n in names), flush=True)
        for name in names:
            slice_ratios = [a / b for a, b in zip(rps[name], rps["bare"])]
            print(f"{name:24s} ratio to bare {requests[name] / requests['bare']:.3f} "
                  f"(slices: median {statistics.median(slice_ratios):.3f}) | CPU per request "
                  f"{cpu[name] / requests[name] * 1e6:.0f} us, main thread {main_cpu[name] / requests[name] * 1e6:.0f} us")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
