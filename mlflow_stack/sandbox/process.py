"""Processes of a sandbox on the controller: the systemd-nspawn supervisor and its container."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from . import cgroup
from .base import SandboxError
from .instance import UPPER

log = logging.getLogger("mlflow_stack.sandbox")

STOP_TIMEOUT = 30.0
children: dict[int, subprocess.Popen[bytes]] = {}  # nspawn processes started here, to reap


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a systemd-nspawn process (clean shutdown), SIGKILL after `timeout`."""
    if not alive(pid):
        return
    signal_pid(pid, signal.SIGTERM)
    if wait_gone(pid, timeout):
        return
    log.warning("sandbox process %d did not shut down in %.0f s; killing it", pid, timeout)
    for init in container_inits(pid):
        signal_pid(init, signal.SIGKILL)
    if wait_gone(pid, 5):
        return
    signal_pid(pid, signal.SIGKILL)
    if not wait_gone(pid, 5):
        raise SandboxError(f"cannot stop systemd-nspawn pid {pid}: kill it by hand")


def kill_leftovers(name: str, groups: list[Path]) -> None:
    """Kill what is left in the sandbox's cgroups (a container whose nspawn was killed)."""
    if not cgroup.pids(groups):
        return
    log.warning("sandbox %s: killing processes left without systemd-nspawn", name)
    deadline = time.monotonic() + 10
    while cgroup.pids(groups):
        if time.monotonic() > deadline:
            raise SandboxError(f"processes of sandbox {name} survive SIGKILL: see {groups[0]}")
        cgroup.kill(groups)
        time.sleep(0.2)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def alive(pid: int) -> bool:
    """True while `pid` runs (zombies count as gone and are reaped if ours)."""
    proc = children.get(pid)
    if proc is not None and proc.poll() is not None:
        del children[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def is_nspawn_of(pid: int, state: Path) -> bool:
    """True if `pid` is a live systemd-nspawn booting the instance `state` (guards pid reuse)."""
    if not alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not args or os.path.basename(args[0]) != b"systemd-nspawn":
        return False
    layer = str(state / UPPER).encode()
    legacy = str(state / "rootfs").encode()  # instances made before the overlay layout
    return any(layer + b":" in arg or arg == legacy for arg in args)


def container_inits(pid: int) -> list[int]:
    """Descendants of `pid` that are PID 1 of their own PID namespace."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        cur = todo.pop()
        for child, parent in parents.items():
            if parent == cur:
                todo.append(child)
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                nspids = next((ln.split()[1:] for ln in status.splitlines()
                               if ln.startswith("NSpid:")), [])  # fmt: skip
                if len(nspids) > 1 and nspids[-1] == "1":
                    found.append(child)
    return found
