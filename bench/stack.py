"""A sandbox for benchmarks: on the host network (the load generator reaches its services
without a tunnel in between), on its own service ports so it can run beside other sandboxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# BENCH_SLOT=N (default 0) shifts every port and the sandbox name, so benchmarks can run
# side by side on one machine (they share its network).
SLOT = int(os.environ.get("BENCH_SLOT", "0"))
PORTS = {"mlflow": 25000 + 10 * SLOT, "jupyter": 28888 + 10 * SLOT, "mysql": 23306 + 10 * SLOT}
SSH_PORT = 2290 + SLOT
# the HTTPS proxy of a public bench host (the host's network is this machine's: not 443/80)
PROXY_PORTS = {"https": 25443 + 10 * SLOT, "http": 25080 + 10 * SLOT}
NAME = "bench" if SLOT == 0 else f"bench{SLOT}"


def inventory(directory: Path, sandbox_name: str, public: bool = False) -> Path:
    """The bench host; `public`: MLflow behind the HTTPS proxy, on PROXY_PORTS."""
    mlflow = (
        f"{{port: {PORTS['mlflow']}, public: true}}" if public else f"{{port: {PORTS['mlflow']}}}"
    )
    text = (
        f"groups:\n  server:\n    hosts: [bench]\nhosts:\n  bench:\n    sandbox: {sandbox_name}\n"
        "    vars:\n"
        f"      mlflow: {mlflow}\n"
        f"      jupyter: {{port: {PORTS['jupyter']}}}\n"
        f"      mysql: {{port: {PORTS['mysql']}}}\n"
    )
    if public:
        text += (
            f"      public: {{https_port: {PROXY_PORTS['https']}, "
            f"http_port: {PROXY_PORTS['http']}}}\n"
        )
    path = directory / "inventory.yaml"
    path.write_text(text)
    return path


def invoke(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run `invoke ARGS` as a user would; (wall seconds, process)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [str(REPO / ".venv/bin/invoke"), *args], cwd=REPO, capture_output=True, text=True
    )
    return time.perf_counter() - started, proc


def provision(inv: Path) -> tuple[float, dict]:
    """`invoke provision --json`: (wall seconds, recap of host bench)."""
    seconds, proc = invoke("provision", "--host", "bench", "--inventory", str(inv), "--json")
    if proc.returncode != 0:
        raise SystemExit(f"provision failed: {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, report["recap"]["bench"]


def median_range(values: list[float]) -> str:
    import statistics

    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"
