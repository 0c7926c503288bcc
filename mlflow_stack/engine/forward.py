"""Local port forwarding to a host (like `ssh -L`), with the host key checked as for commands.

With OpenSSH (the default) the forwards are an `ssh -N -L …` process of their own, with the
options, configuration and host key rules of every other `ssh` of the tool (an impostor is
refused before anything reaches it); it ends with the context. With Paramiko
(`MLFLOW_STACK_SSH=paramiko`, or no `ssh`) they are `direct-tcpip` channels on the host's
Paramiko link, whose host key was checked when it opened. Either way the listening sockets
exist before the context is entered, so a port in use fails at once with a clear error and a
client may connect immediately.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_stack.engine.host import Host, HostError, use_openssh
from mlflow_stack.engine.link import CONNECT_TIMEOUT

if TYPE_CHECKING:
    import paramiko

IN_USE = "local port {port} is already in use; pick other local ports (--offset)"


class Forwarding:
    """Open forwards; `ended()` says why they stopped (None while they work)."""

    def __init__(self, proc: subprocess.Popen | None = None, name: str = "") -> None:
        self.proc = proc
        self.name = name

    def ended(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"{self.name}: the SSH connection of the forwards ended: {_stderr(self.proc)}"


def _stderr(proc: subprocess.Popen) -> str:
    data = proc.stderr.read() if proc.stderr else b""
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exited with {proc.returncode}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- OpenSSH -------------------------------------------------------------------------------


@contextlib.contextmanager
def _ssh_forwards(host: Host, specs: list[str], ready) -> Iterator[Forwarding]:
    """Run `ssh -N -L spec…` until the context ends; `ready()` says when it listens."""
    from mlflow_stack.engine import hostkeys, openssh

    host.connect()  # the master: the host key was checked, the host is known to answer
    openssh.check_pins_supported(host.name, host.target)
    directory = openssh.control_dir()
    files = openssh.Files.in_dir(directory).install()
    spy = directory / f"forward-{secrets.token_hex(6)}.offered"
    proc = subprocess.Popen(
        openssh.forward_argv(host.target, files, specs),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=openssh.ssh_env(spy),
    )
    try:
        deadline = time.monotonic() + 3 * CONNECT_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                offered = openssh.Offered.read(spy)
                refused = openssh.host_key_message(host.name, host.target, stderr, offered)
                if refused:
                    raise hostkeys.HostKeyError(refused)
                if "Address already in use" in stderr or "cannot listen" in stderr:
                    raise HostError(
                        f"{host.name}: a local port to forward is already in use; pick other "
                        "local ports (--offset)"
                    )
                raise HostError(openssh.classify(host.name, host.target, stderr, offered))
            if time.monotonic() > deadline:
                raise HostError(f"{host.name}: the SSH forwards did not start within 30 s")
            time.sleep(0.05)
        yield Forwarding(proc, host.name)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            spy.unlink()


# --- Paramiko ------------------------------------------------------------------------------


def _pump(client: socket.socket, channel: paramiko.Channel) -> None:
    with contextlib.suppress(OSError), client, channel:
        while True:
            ready, _, _ = select.select([client, channel], [], [], 1.0)
            if client in ready:
                data = client.recv(65536)
                if not data:
                    break
                channel.sendall(data)
            if channel in ready:
                data = channel.recv(65536)
                if not data:
                    break
                client.sendall(data)


def _serve(
    listener: socket.socket,
    transport: paramiko.Transport,
    remote: tuple[str, int],
    stop: threading.Event,
) -> None:
    import paramiko

    while not stop.is_set():
        try:
            client, origin = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        if isinstance(origin, str) or not origin:
            origin = ("127.0.0.1", 0)  # a unix socket's peer has no address
        try:
            channel = transport.open_channel("direct-tcpip", remote, origin, timeout=10)
        except (paramiko.SSHException, OSError):
            client.close()
            continue
        threading.Thread(target=_pump, args=(client, channel), daemon=True).start()


@contextlib.contextmanager
def _paramiko_forward(host: Host, listener: socket.socket, remote: tuple[str, int]):
    transport = host.paramiko_transport()
    listener.listen(16)
    listener.settimeout(0.5)
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, transport, remote, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=2)


# --- the forwards --------------------------------------------------------------------------


@contextlib.contextmanager
def forwards(
    host: Host, pairs: list[tuple[int, int]], remote_host: str = "127.0.0.1"
) -> Iterator[Forwarding]:
    """Forward each 127.0.0.1:local to `remote_host`:remote as seen from the host."""
    busy = [local for local, _ in pairs if not _port_free(local)]
    if busy:
        raise HostError(IN_USE.format(port=busy[0]))
    if use_openssh():
        specs = [f"127.0.0.1:{local}:{remote_host}:{remote}" for local, remote in pairs]

        def ready() -> bool:
            return not any(_port_free(local) for local, _ in pairs)

        with _ssh_forwards(host, specs, ready) as forwarding:
            yield forwarding
        return
    with contextlib.ExitStack() as stack:
        for local, remote in pairs:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", local))
            except OSError:
                listener.close()
                raise HostError(IN_USE.format(port=local)) from None
            stack.enter_context(_paramiko_forward(host, listener, (remote_host, remote)))
        yield Forwarding(None, host.name)


@contextlib.contextmanager
def forward(host: Host, local_port: int, remote_port: int, remote_host: str = "127.0.0.1"):
    """One forward of 127.0.0.1:`local_port` (0: any free port); yields the local port."""
    port = local_port or free_port()
    with forwards(host, [(port, remote_port)], remote_host):
        yield port


@contextlib.contextmanager
def forward_unix(host: Host, remote_port: int, remote_host: str = "127.0.0.1") -> Iterator[Path]:
    """Forward a new unix socket in this user's private (0700) SSH directory to
    `remote_host`:`remote_port` on the host: no other local user can connect through it."""
    from mlflow_stack.engine import openssh

    path = openssh.control_dir() / f"fwd-{secrets.token_hex(6)}.sock"
    try:
        if use_openssh():
            with _ssh_forwards(host, [f"{path}:{remote_host}:{remote_port}"], path.exists):
                yield path
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise HostError(f"{path}: already in use") from None
            raise
        finally:
            os.umask(old)
        with _paramiko_forward(host, listener, (remote_host, remote_port)):
            yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
