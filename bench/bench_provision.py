"""Provisioning speed on a sandbox: cold converge from a bare host, then no-op converges.

    .venv/bin/python bench/bench_provision.py [--runs 5] [--keep]

Prints the wall time of `invoke provision` as a user runs it (process start to exit), the
engine's own time, and the SSH commands per run; beside them, measured in the same run, the
floor of any SSH-based tool: one fresh SSH connection running one command. Reference measured
on this machine for an equivalent Ansible 12 playbook (not runnable here without Ansible):
cold ≈ 64 s, no-op ≈ 13-15 s with 60-198 SSH commands.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from stack import NAME, SSH_PORT, inventory, invoke, median_range, provision

from mlflow_stack import sandbox


def ssh_floor(info, runs: int) -> list[float]:
    """One new SSH connection + `true`, with the OpenSSH client."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(info.ssh_command("true"), check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def cold_provision(inv: Path) -> tuple[float, dict, list[dict]]:
    """Like `stack.provision`, also returning every step's result (for the slowest steps)."""
    import json

    seconds, proc = invoke("provision", "--host", "bench", "--inventory", str(inv), "--json")
    if proc.returncode != 0:
        raise SystemExit(f"provision failed: {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, report["recap"]["bench"], report["hosts"]["bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="no-op runs (median)")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox afterwards")
    args = parser.parse_args()
    name = NAME
    sandbox.down(name)
    info = sandbox.up(name, SSH_PORT, network="host")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = inventory(Path(tmp), name)
            cold, recap, steps = cold_provision(inv)
            print(
                f"cold converge (bare sandbox -> all healthy): {cold:.1f} s wall, "
                f"{recap['changed']} changes, {recap['ssh_commands']} SSH commands"
            )
            print("  per role: " + ", ".join(f"{k} {v:.1f}s" for k, v in recap["roles"].items()))
            slowest = sorted(steps, key=lambda s: -s.get("seconds", 0))[:6]
            print(
                "  slowest steps: "
                + ", ".join(f"{s['role']}/{s['step']} {s.get('seconds', 0):.1f}s" for s in slowest)
            )
            walls, engine, commands = [], [], []
            for _ in range(args.runs):
                wall, recap = provision(inv)
                assert recap["changed"] == 0, f"not a no-op: {recap}"
                walls.append(wall)
                engine.append(recap["seconds"])
                commands.append(recap["ssh_commands"])
            print(
                f"no-op converge, {args.runs} runs: {median_range(walls)} wall; engine "
                f"{statistics.median(engine):.2f} s; {max(commands)} SSH commands per run"
            )
            floor = ssh_floor(info, args.runs)
            print(f"floor: fresh OpenSSH connection + one command: {median_range(floor)}")
            print(
                "reference (Ansible 12, measured earlier on this machine): cold ≈ 64 s, "
                "no-op ≈ 13-15 s, 60-198 SSH commands"
            )
    finally:
        if not args.keep:
            sandbox.down(name)


if __name__ == "__main__":
    main()
