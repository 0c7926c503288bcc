"""Shared types, locations and preflight checks of the sandbox host."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow_stack.errors import UserError

CACHE_ENV = "MLFLOW_STACK_CACHE"
STATE_ENV = "MLFLOW_STACK_STATE"
DEFAULT_CACHE = Path("/var/cache/mlflow-stack")
DEFAULT_STATE = Path("/var/lib/mlflow-stack")
USER = "ubuntu"
ADDRESS = "127.0.0.1"  # sshd's address in the shared (host) network mode
NETWORK_ENV = "MLFLOW_STACK_SANDBOX_NETWORK"
NETWORKS = ("private", "host")
DEFAULT_NETWORK = "private"
PRIVATE_PORT = 22  # sshd's port on a private sandbox, as on EC2
DEFAULT_HOST_PORT = 2222

# tool -> Debian package that provides it
TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh-keygen": "openssh-client",
    "tar": "tar",
}
NETWORK_TOOLS = {"nft": "nftables", "ip": "iproute2"}  # for the private network only
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class SandboxError(UserError):
    """Any sandbox failure; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class SandboxInfo:
    """How to reach one running sandbox over SSH."""

    name: str
    address: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    pid: int
    state_dir: Path

    @property
    def ssh_config(self) -> Path:
        """An ssh_config file with a `Host <name>` entry (`ssh -F <file> <name>`)."""
        return self.state_dir / "ssh_config"

    @property
    def log_file(self) -> Path:
        """Console output of systemd-nspawn (the container's boot log)."""
        return self.state_dir / "nspawn.log"

    @property
    def host_string(self) -> str:
        """`user@address:port`, as accepted by Fabric and `--host`."""
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def connect_kwargs(self) -> dict[str, object]:
        """Keyword arguments for paramiko/Fabric `connect` (key only, no agent)."""
        return {"key_filename": str(self.key_file), "look_for_keys": False, "allow_agent": False}

    def ssh_options(self) -> list[str]:
        """OpenSSH client options: the key, the port and the pinned host key."""
        return [
            "-i", str(self.key_file),
            "-p", str(self.port),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh_command(self, command: str | None = None) -> list[str]:
        """argv of `ssh` to this sandbox, interactive when `command` is None."""
        argv = ["ssh", *self.ssh_options(), f"{self.user}@{self.address}"]
        return [*argv, "--", command] if command else argv


def cache_dir() -> Path:
    """Directory holding the cached root filesystem tarballs (survives fresh clones)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).absolute()


def state_root() -> Path:
    """Directory holding one sub-directory per sandbox instance."""
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE).absolute() / "sandboxes"


def instance_dir(name: str) -> Path:
    """State directory of the sandbox `name`."""
    return state_root() / check_name(name)


def is_valid_name(name: str) -> bool:
    """True if `name` can name a sandbox (a hostname label)."""
    return bool(_NAME_RE.match(name))


def check_name(name: str) -> str:
    """Return `name` if it is a valid sandbox (host)name, else raise SandboxError."""
    if not is_valid_name(name):
        raise SandboxError(
            f"invalid sandbox name {name!r}: use 1-63 lowercase letters, digits and '-' "
            "(it becomes the hostname)"
        )
    return name


def check_port(port: int) -> int:
    """Return `port` if usable for sshd, else raise SandboxError."""
    if not 1024 <= port <= 65535:
        raise SandboxError(f"invalid SSH port {port}: pick one in 1024-65535")
    return port


def default_network() -> str:
    """The network mode used when none is asked for ($MLFLOW_STACK_SANDBOX_NETWORK or private)."""
    return os.environ.get(NETWORK_ENV) or DEFAULT_NETWORK


def check_network(network: str) -> str:
    """Return `network` if it is a known mode, else raise SandboxError."""
    if network not in NETWORKS:
        raise SandboxError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")
    return network


def which(tool: str) -> str | None:
    """Full path of `tool`, also looking in the sbin directories."""
    path = os.environ.get("PATH", "") + ":" + _SBIN_PATH
    return shutil.which(tool, path=path)


def preflight_problem(*, need_debootstrap: bool = True, need_network: bool = False) -> str | None:
    """Why the sandbox cannot run here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "the sandbox needs root (systemd-nspawn, debootstrap): run as root or with sudo"
    needed = {**TOOLS, **(NETWORK_TOOLS if need_network else {})}
    tools = [t for t in needed if need_debootstrap or t != "debootstrap"]
    missing = [t for t in tools if which(t) is None]
    if missing:
        pkgs = sorted({needed[t] for t in missing})
        return (
            f"missing {', '.join(missing)}: install the Debian package(s) with "
            f"`apt-get install {' '.join(pkgs)}`"
        )
    return None


def preflight(*, need_debootstrap: bool = True, need_network: bool = False) -> None:
    """Raise SandboxError when not root or a required tool is missing."""
    problem = preflight_problem(need_debootstrap=need_debootstrap, need_network=need_network)
    if problem:
        raise SandboxError(problem)
