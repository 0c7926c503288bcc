"""A local systemd test host reachable over SSH: Debian 12 booted with systemd-nspawn.

It looks like a fresh EC2 Ubuntu instance to the engine: user `ubuntu` with passwordless sudo,
key-only SSH on 127.0.0.1:<port>, systemd as PID 1, the host's network (loopback included).

Cache ($MLFLOW_STACK_CACHE, default /var/cache/mlflow-stack): the debootstrapped root
filesystem as `debian12-rootfs-<recipe key>.tar`, and `debian12-base-*/`, that tarball unpacked
once with the controller's CA certificates added: the read-only lower layer of every instance.
State ($MLFLOW_STACK_STATE/sandboxes/<name>, default /var/lib/mlflow-stack/sandboxes/<name>):
`upper/` (the instance's own overlay layer: every change made on the host), the SSH key,
known_hosts, ssh_config, instance.json and the console log `nspawn.log`.
"""

from .base import (
    SandboxError,
    SandboxInfo,
    cache_dir,
    instance_dir,
    preflight,
    preflight_problem,
    state_root,
)
from .machine import down, list_sandboxes, load, prune, reboot, status, up
from .rootfs import cache_key, tarball_path
from .ssh import Result, connect, exec_command, run

__all__ = [
    "Result",
    "SandboxError",
    "SandboxInfo",
    "cache_dir",
    "cache_key",
    "connect",
    "down",
    "exec_command",
    "instance_dir",
    "list_sandboxes",
    "load",
    "preflight",
    "preflight_problem",
    "prune",
    "reboot",
    "run",
    "state_root",
    "status",
    "tarball_path",
    "up",
]
