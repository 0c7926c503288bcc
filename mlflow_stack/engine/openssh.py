"""SSH through the OpenSSH client, multiplexed over one master connection per target.

`open()` starts a master (`ssh -M -N -f`, `ControlPersist`) unless one already listens on
the target's control socket; every command is then an `ssh` process that opens a session
over that socket: no key exchange, no Paramiko. The master outlives the run by
`CONTROL_PERSIST` seconds, so the next `invoke` finds it warm. Sockets live in a per-user
0700 directory (`control_dir()`); a stale one (its master killed) is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from mlflow_stack.engine.link import CONNECT_TIMEOUT, HostError, Output, Target, unreachable

CONTROL_PERSIST = 600  # seconds a master stays after its last command
DIR_ENV = "MLFLOW_STACK_SSH_DIR"


def control_dir() -> Path:
    """This user's directory of control sockets, created 0700; refused if others can use it."""
    if os.environ.get(DIR_ENV):
        path = Path(os.environ[DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "mlflow-stack-ssh"
    else:
        path = Path(f"/tmp/mlflow-stack-ssh-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise HostError(
            f"{path}: SSH control socket directory must be a directory of yours with mode 0700; "
            f"remove it or set {DIR_ENV}"
        )
    return path


def control_path(target: Target, directory: Path) -> Path:
    """The socket of `target`'s master: one per user, address, port, key and known_hosts."""
    files = [str(p.absolute()) if p else "" for p in (target.key_file, target.known_hosts)]
    ident = "\0".join([target.user, target.address, str(target.port), *files])
    return directory / hashlib.sha256(ident.encode()).hexdigest()[:20]


def _quoted(value: object) -> str:
    """An `-o` value or path, with `%` escaped (OpenSSH expands %-tokens)."""
    text = str(value).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def options(target: Target, control: Path) -> list[str]:
    """Client options shared by the master and every command."""
    opts = [
        "-T", "-x", "-a",
        "-p", str(target.port),
        "-l", target.user,
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", "LogLevel=ERROR",
        "-o", "ClearAllForwardings=yes",
        "-o", "RemoteCommand=none",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", f"ControlPath={_quoted(control)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
    ]  # fmt: skip
    if target.key_file is not None:  # absolute: the master runs in /
        opts += ["-i", _quoted(target.key_file.absolute()), "-o", "IdentitiesOnly=yes"]
    if target.known_hosts is not None:
        opts += ["-o", f"UserKnownHostsFile={_quoted(target.known_hosts.absolute())}"]
        opts += ["-o", "StrictHostKeyChecking=yes"]
    else:  # as with Paramiko's AutoAddPolicy: any host key, nothing written
        opts += ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
    return opts


def master_argv(target: Target, control: Path) -> list[str]:
    """`ssh` starting the master: it backgrounds itself once authenticated."""
    return [
        "ssh", *options(target, control),
        "-M", "-N", "-f", "-o", f"ControlPersist={CONTROL_PERSIST}",
        "--", target.address,
    ]  # fmt: skip


def command_argv(target: Target, control: Path, command: str) -> list[str]:
    """`ssh` running `command` over the master (a direct connection if it is gone)."""
    return [
        "ssh",
        *options(target, control),
        "-o",
        "ControlMaster=no",
        "--",
        target.address,
        command,
    ]


def ssh_env() -> dict[str, str]:
    """The client's environment without LANG/LC_*: like Paramiko, send no locale to the host."""
    return {k: v for k, v in os.environ.items() if k != "LANG" and not k.startswith("LC_")}


def listening(path: Path) -> bool:
    """True if a master answers on `path`; a stale socket (nobody listening) is removed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False
    except OSError:
        return False
    finally:
        sock.close()


_PERMISSION = re.compile(r"^.*Permission denied.*$", re.M)
_CONNECT = re.compile(r"ssh: connect to host \S+ port \d+: (.+)")
_RESOLVE = re.compile(r"ssh: Could not resolve hostname [^:]+: (.+)")


def classify(name: str, target: Target, stderr: str) -> str:
    """The one-line `HostError` message for a failed master start, from ssh's stderr."""
    t = target
    if m := _PERMISSION.search(stderr):
        key = f" with key {t.key_file}" if t.key_file else ""
        return (
            f"{name}: SSH authentication failed for {t.label}{key} ({m[0].strip()}); "
            "check the user and the key in the inventory"
        )
    if "IDENTIFICATION HAS CHANGED" in stderr or "has changed and you have requested" in stderr:
        return (
            f"{name}: host key of {t.label} does not match the known one; "
            "if the host was rebuilt, remove its old key from known_hosts"
        )
    if "Host key verification failed" in stderr:
        return (
            f"{name}: host key of {t.label} is not in {t.known_hosts}; "
            "add the host's key there (or check the address and port)"
        )
    if m := _CONNECT.search(stderr) or _RESOLVE.search(stderr):
        reason = m[1].strip()
        return unreachable(name, t, None if "timed out" in reason else reason)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"{name}: SSH to {t.label} failed: {lines[-1] if lines else 'ssh exited with 255'}"


class OpenSshLink:
    """Commands as `ssh` processes sharing one master connection to `target`."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self._control: Path | None = None

    @property
    def is_open(self) -> bool:
        return self._control is not None

    def open(self) -> None:
        """Find this target's master, or start one (one starter at a time, across processes)."""
        control = control_path(self.target, control_dir())
        with open(f"{control}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not listening(control):
                self._start_master(control)
        self._control = control

    def _start_master(self, control: Path) -> None:
        argv = master_argv(self.target, control)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=ssh_env(),
                cwd="/",  # it outlives this run: hold no directory of the controller's
                timeout=3 * CONNECT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise HostError(unreachable(self.name, self.target, None)) from None
        if proc.returncode != 0:
            raise HostError(classify(self.name, self.target, proc.stderr.decode(errors="replace")))

    def run(self, command: str, stdin: bytes | None, timeout: float | None, on_output) -> Output:
        """Run `command` in an `ssh` process; `timeout`: at most that long without output."""
        assert self._control is not None, "open() first"
        proc = subprocess.Popen(
            command_argv(self.target, self._control, command),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ssh_env(),
        )
        return _collect(proc, stdin, timeout, on_output)

    def stream(self, command: str, source, sink, timeout: float | None) -> Output:
        """Run `command`, stdin from `source`, stdout to `sink` (`engine.streams`)."""
        from mlflow_stack.engine import streams

        assert self._control is not None, "open() first"
        proc = subprocess.Popen(
            command_argv(self.target, self._control, command),
            stdin=subprocess.PIPE if source is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ssh_env(),
        )
        return streams.pump_process(proc, source, sink, timeout)

    def close(self) -> None:
        """Nothing to close: the master stays for the next commands and runs."""
        self._control = None


def _collect(proc: subprocess.Popen, stdin: bytes | None, timeout: float | None, on_output):
    """Feed stdin, stream stdout (line by line to `on_output`), gather stderr, wait."""
    last = [time.monotonic()]
    errors: list[bytes] = []

    def drain_errors() -> None:
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
            errors.append(chunk)
            last[0] = time.monotonic()

    def feed() -> None:
        with contextlib.suppress(OSError):
            proc.stdin.write(stdin)
        with contextlib.suppress(OSError):
            proc.stdin.close()

    threads = [threading.Thread(target=drain_errors, daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for thread in threads:
        thread.start()
    out, pending, fd = [], b"", proc.stdout.fileno()
    silent = False
    while True:
        wait = None if not timeout else max(0.0, last[0] + timeout - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            if timeout and time.monotonic() - last[0] >= timeout:
                silent = True
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        last[0] = time.monotonic()
        out.append(chunk)
        if on_output is not None:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_output(line.decode(errors="replace"))
    if silent:
        proc.kill()
    if on_output is not None and pending:
        on_output(pending.decode(errors="replace"))
    rc = proc.wait()
    for thread in threads:
        thread.join(timeout=5)
    proc.stdout.close()
    proc.stderr.close()
    stderr = b"".join(errors).decode(errors="replace")
    return Output(None if silent else rc, b"".join(out).decode(errors="replace"), stderr)
