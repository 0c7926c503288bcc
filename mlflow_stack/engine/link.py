"""What every SSH transport shares: the target, the one-line error, a command's output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlflow_stack.errors import UserError

CONNECT_TIMEOUT = 10


class HostError(UserError):
    """A host could not be reached or used; the message is one line naming the fix."""


@dataclass(frozen=True)
class Target:
    """How to reach a host over SSH."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None  # the known_hosts file to check (and accept-new into)
    host_keys: tuple[str, ...] = ()  # pinned keys (`[type ]SHA256:…`): only these accepted
    host_key_policy: str | None = None  # strict | accept-new | off; None: ~/.ssh/config's
    ssh_host: str | None = None  # the ~/.ssh/config alias given to ssh (else the address)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


@dataclass(frozen=True)
class Output:
    """What a remote command left: its exit code (None: stopped for silence), its output."""

    rc: int | None
    stdout: str
    stderr: str


class Link(Protocol):
    """A transport to one target: opened once, then one remote command per `run`."""

    @property
    def is_open(self) -> bool: ...

    def open(self) -> None: ...

    def run(self, command: str, stdin: bytes | None, timeout: float | None, on_output) -> Output:
        """Run `command`; `timeout`: stop it after that many seconds without output."""
        ...

    def stream(self, command: str, source, sink, timeout: float | None) -> Output:
        """Run `command` with stdin from `source` (an iterable of byte chunks, or None) and
        every chunk of stdout handed to `sink` as it comes, never kept (`engine.streams`);
        `timeout`: stop it after that many seconds without data moving."""
        ...

    def close(self) -> None: ...


def unreachable(name: str, target: Target, reason: str | None) -> str:
    """The one-line message for a host that cannot be reached (`reason` None: a timeout)."""
    if reason is None:
        return (
            f"{name}: cannot reach {target.label}: no answer within {CONNECT_TIMEOUT} s; "
            "check the address, the port and the firewall/security group"
        )
    return (
        f"{name}: cannot reach {target.label}: {reason}; check the address and that sshd is running"
    )
