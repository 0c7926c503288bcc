"""Shared helpers for end-to-end tests: inventories for a sandbox, CLI runs, host commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow_stack.engine.host import Host, Target

ROOT = Path(__file__).resolve().parents[2]


def target(info, name: str = "e2e") -> Target:
    return Target(name, info.address, info.port, info.user, info.key_file, info.known_hosts)


def host(info, name: str = "e2e") -> Host:
    return Host(target(info, name))


def inventory(tmp_path: Path, info, name: str = "e2e", vars_yaml: str = "") -> Path:
    """An inventory naming the running sandbox `info` as host `name` (in the server group)."""
    path = tmp_path / "inventory.yaml"
    text = f"groups:\n  server:\n    hosts: [{name}]\nhosts:\n  {name}:\n    sandbox: {info.name}\n"
    if vars_yaml:
        text += "    vars:\n" + "".join(f"      {line}\n" for line in vars_yaml.splitlines())
    path.write_text(text)
    return path


def invoke(*args: str, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `invoke ARGS…` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def provision_json(inv: Path, *extra: str, host_name: str = "e2e", env: dict | None = None):
    """`invoke provision --json`: (exit code, parsed JSON or None, completed process)."""
    proc = invoke(
        "provision", "--host", host_name, "--inventory", str(inv), "--json", *extra, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc


def changed_steps(report: dict, host_name: str = "e2e") -> list[str]:
    return [
        f"{s['role']}: {s['step']}" for s in report["hosts"][host_name] if s["status"] == "changed"
    ]


def sh(h: Host, script: str, **kwargs) -> str:
    """Run `script` as root on the host; fail the test with its stderr on a non-zero exit."""
    result = h.run(script, **kwargs)
    assert result.ok, f"{script!r} failed ({result.rc}): {result.stderr.strip()}"
    return result.stdout


def ok(proc: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI run that must have succeeded."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a CLI run that must have failed cleanly (no traceback)."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def wait_until(check, seconds: float, what: str):
    """Poll `check()` every 0.5 s until it is truthy (and return it); fail after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {seconds:.0f} s"
        time.sleep(0.5)
