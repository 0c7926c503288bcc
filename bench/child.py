"""Run one demo_wine CLI as a child process and read its last stdout line as JSON."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "demo_wine" / "data" / "winequality-white.csv"


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_json(
    module: str, args: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, dict]:
    """``python -m MODULE ARGS`` with the repo on PYTHONPATH; (wall seconds, its JSON line
    with ``_cpu_s``, the child's own CPU seconds, added). Raises RuntimeError with the end of
    stderr when the process fails."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{module} exited {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["_cpu_s"] = children_cpu() - cpu0
    return wall, result
