"""A local systemd test host reachable over SSH: Debian booted with systemd-nspawn.

It looks like a fresh EC2 instance to the engine: user `ubuntu` with passwordless sudo,
key-only SSH, systemd as PID 1.

Networks (`up(network=...)`, `invoke sandbox.up --network ...`):

- `private`, the default: the sandbox has its own network namespace on the bridge
  `mlfstack0`, an address of the sandboxes' subnet (10.77.0.0/24, $MLFLOW_STACK_SANDBOX_SUBNET)
  allocated machine-wide or asked for (`address=`), sshd on <address>:22, outbound access
  through NAT (see `network`). It is the default because that is what the tool provisions in
  real life: hosts on a VPC, services on their default ports, several hosts side by side
  (each with its own 3306, 5000, 8888), services bound to 127.0.0.1 out of the controller's
  reach (reached through SSH tunnels), and hosts that reach each other by address.
- `host`: the controller's network namespace, sshd on 127.0.0.1:<port> (2222 by default); the
  sandbox's loopback services are the controller's. Kept for what needs that (and meant by the
  older call `up(name, port)`).

Distributions (`distro=`): bookworm (default), trixie, sid; see `distro`.
Size (`cpus=`, `memory=`): CPU affinity (`nproc` inside says N) and a memory cgroup limit whose
OOM kills `oom_kills(name)` and `status(name)` report; see `cgroup`.

Cache ($MLFLOW_STACK_CACHE, default /var/cache/mlflow-stack), per distribution: the
debootstrapped root filesystem `debian-<suite>-rootfs-<recipe key>.tar`, and
`debian-<suite>-base-*/`, that tarball unpacked once with the controller's CA certificates
added: the read-only lower layer of every instance.
State ($MLFLOW_STACK_STATE/sandboxes/<name>, default /var/lib/mlflow-stack/sandboxes/<name>):
`upper/` (the instance's own overlay layer: every change made on the host), the SSH key,
known_hosts, ssh_config, instance.json (network, address, port, distro, cpus, memory, pid,
cgroups) and the console log `nspawn.log`.
Machine-wide (never per state root): the address leases in /var/lib/mlflow-stack-network.
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
from .distro import DISTROS
from .machine import down, list_sandboxes, load, oom_kills, prune, reboot, status, up
from .rootfs import cache_key, tarball_path
from .ssh import Result, connect, exec_command, run

__all__ = [
    "DISTROS",
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
    "oom_kills",
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
