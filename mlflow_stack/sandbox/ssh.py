"""Minimal SSH access to a sandbox with paramiko: pinned host key, key-only auth.

Paramiko is imported by `connect()`, not with this module: `sandbox.load()` (used to resolve
an inventory host) needs none of it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import SandboxInfo

if TYPE_CHECKING:
    import paramiko


@dataclass(frozen=True)
class Result:
    """Outcome of one remote command."""

    rc: int
    stdout: str
    stderr: str


def banner(address: str, port: int, timeout: float = 1.0) -> str | None:
    """The SSH identification line served on `address:port`, or None."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            line = sock.recv(256).split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError:
        return None
    return line if line.startswith("SSH-") else None


def connect(info: SandboxInfo, timeout: float = 10.0) -> paramiko.SSHClient:
    """An authenticated SSHClient; the host key must match `info.known_hosts`."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(info.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            info.address, info.port, username=info.user, timeout=timeout,
            banner_timeout=timeout, auth_timeout=timeout, **info.connect_kwargs,
        )  # fmt: skip
    except BaseException:
        client.close()
        raise
    return client


def exec_command(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> Result:
    """Run `command` on an open client; raise TimeoutError after `timeout` seconds."""
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    chan.settimeout(timeout)
    chan.exec_command(command)
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        if time.monotonic() > deadline:
            chan.close()
            raise TimeoutError(f"{command!r} did not finish in {timeout:.0f} s")
        time.sleep(0.02)
    rc = chan.recv_exit_status()
    chan.close()
    return Result(rc, out.decode(errors="replace"), err.decode(errors="replace"))


def run(info: SandboxInfo, command: str, timeout: float = 60.0) -> Result:
    """Open a connection, run one command, close."""
    client = connect(info, timeout=min(timeout, 10.0))
    try:
        return exec_command(client, command, timeout)
    finally:
        client.close()
