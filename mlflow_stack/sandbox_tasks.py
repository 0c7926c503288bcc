"""Invoke tasks for the local sandbox host: `sandbox.up`, `.down`, `.reboot`, `.ssh`, `.status`,
`.list`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from invoke import Collection, task
from invoke.exceptions import Exit

if TYPE_CHECKING:
    from mlflow_stack.sandbox import SandboxInfo

T = TypeVar("T")
NAME_HELP = "sandbox name, also its hostname (default: sandbox)"


def _call(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a sandbox function with progress on stderr; SandboxError -> one line, exit 1."""
    from mlflow_stack.sandbox import SandboxError

    logger = logging.getLogger("mlflow_stack.sandbox")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sandbox: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        return fn(*args, **kwargs)
    except SandboxError as exc:
        raise Exit(f"sandbox: {exc}", code=1) from None


def _sb():
    """The sandbox package, imported when a sandbox task runs (not for `invoke --list`)."""
    from mlflow_stack import sandbox

    return sandbox


def _loaded(name: str) -> SandboxInfo:
    info = _call(_sb().load, name)
    if info is None:
        hint = f"start it with `invoke sandbox.up --name {name}`"
        raise Exit(f"sandbox: {name} is not running: {hint}")
    return info


@task(
    help={
        "name": NAME_HELP,
        "network": "private (default: own address on the sandboxes' bridge, ssh on port 22) "
        "or host (the controller's network, ssh on 127.0.0.1:--port)",
        "address": "private network: ask for this address (default: the first free one)",
        "port": "host network: SSH port on 127.0.0.1 (default: 2222)",
        "distro": "Debian suite: bookworm (default), trixie or sid",
        "cpus": "CPUs the host may use (nproc says so), e.g. 1",
        "memory": "memory limit of the host (a cgroup), e.g. 1G or 512M",
        "fresh": "rebuild the cached Debian root filesystem and start from a pristine host",
    }
)
def up(
    c, name="sandbox", network=None, address=None, port=None, distro=None, cpus=None,
    memory=None, fresh=False,
):  # fmt: skip
    """Boot a local systemd test host (Debian, user ubuntu) reachable over SSH."""
    started = time.monotonic()
    info = _call(
        _sb().up, name, int(port) if port else None, fresh=fresh, network=network,
        address=address, distro=distro, cpus=int(cpus) if cpus else None, memory=memory,
    )  # fmt: skip
    print(f"{info.name} is up ({time.monotonic() - started:.1f} s): ssh {info.host_string}")
    print(f"  address {info.address}, key {info.key_file}, pid {info.pid}")
    print(f"  ssh -F {info.ssh_config} {info.name}   or   invoke sandbox.ssh --name {info.name}")


@task(help={"name": NAME_HELP, "keep": "keep the root filesystem for a later `up`"})
def down(c, name="sandbox", keep=False):
    """Stop a sandbox and delete its root filesystem and state."""
    started = time.monotonic()
    if _call(_sb().down, name, keep=keep):
        print(f"{name} is down ({time.monotonic() - started:.1f} s)")
    else:
        print(f"{name}: no such sandbox")


@task(help={"name": NAME_HELP})
def reboot(c, name="sandbox"):
    """Restart a sandbox like a host reboot: its disk is kept, its services start at boot."""
    started = time.monotonic()
    info = _call(_sb().reboot, name)
    elapsed = time.monotonic() - started
    print(f"{info.name} rebooted ({elapsed:.1f} s): ssh {info.host_string}, pid {info.pid}")


@task(help={"name": NAME_HELP, "command": "run this command instead of an interactive shell"})
def ssh(c, name="sandbox", command=None):
    """Open a shell (or run a command) on a sandbox as ubuntu, host key pinned."""
    argv = _loaded(name).ssh_command(command)
    rc = subprocess.call(argv)
    if rc != 0:
        raise Exit(code=rc)


@task(help={"name": NAME_HELP, "json": "print the status as one JSON object"})
def status(c, name="sandbox", json_=False):
    """Show whether a sandbox runs (exit 3 if not), its address, size, OOM kills, systemd state."""
    facts = _call(_sb().status, name)
    if json_:
        print(json.dumps(facts))
    else:
        for key, value in facts.items():
            print(f"{key:13} {value}")
    if not facts["running"]:
        raise Exit(code=3)


@task(name="list")
def list_(c):
    """List the running sandboxes."""
    for info in _call(_sb().list_sandboxes):
        print(f"{info.name:20} {info.address:15} {info.host_string:28} pid {info.pid}")


ns = Collection("sandbox")
for _task in (up, down, reboot, ssh, status, list_):
    ns.add_task(_task)
