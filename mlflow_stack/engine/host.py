"""One SSH connection per host: run commands (as root through `sudo -n`), feed stdin.

Paramiko and Fabric are imported when a connection opens, not with this module (the
inventory uses `Target` without them). `connect_soon()` opens the connection in the
background, so the controller does other work meanwhile; the first command waits for it.
"""

from __future__ import annotations

import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_stack.secrets import mask

if TYPE_CHECKING:
    import paramiko
    from fabric import Connection

CONNECT_TIMEOUT = 10


class HostError(Exception):
    """A host could not be reached or used; the message is one line naming the fix."""


class CommandError(HostError):
    """A remote command exited non-zero."""

    def __init__(self, what: str, result: RunResult) -> None:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = " | ".join(detail[-3:]) if detail else "no output"
        super().__init__(mask(f"{what} failed (exit {result.rc}): {tail}"))
        self.result = result


@dataclass(frozen=True)
class Target:
    """How to reach a host over SSH."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None  # pin host keys from this file (strict)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Host:
    """A host reached through one Fabric connection, reused for every command."""

    target: Target
    commands: int = 0
    _conn: Connection | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _connect_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _opening: threading.Thread | None = field(default=None, repr=False)
    _open_error: Exception | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def is_root(self) -> bool:
        return self.target.user == "root"

    def connect_soon(self) -> None:
        """Start opening the connection in a background thread; `connect()` waits for it."""
        if self._opening is not None or self._conn is not None:
            return

        def open_it() -> None:
            try:
                self._open()
            except Exception as exc:  # raised by the `connect()` that waits for this thread
                self._open_error = exc

        self._opening = threading.Thread(target=open_it, name=f"connect {self.name}", daemon=True)
        self._opening.start()

    def connect(self) -> None:
        """Open the SSH connection (once); errors become one-line `HostError`s."""
        with self._connect_lock:
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.join()
                error, self._open_error = self._open_error, None
                if error is not None:
                    raise error
            if self._conn is not None and self._conn.is_connected:
                return
            self._open()

    def _open(self) -> None:
        import paramiko
        from fabric import Connection

        t = self.target
        kwargs: dict = {"look_for_keys": t.key_file is None, "banner_timeout": CONNECT_TIMEOUT}
        if t.key_file is not None:
            kwargs["key_filename"] = [str(t.key_file)]
        conn = Connection(
            t.address,
            user=t.user,
            port=t.port,
            connect_timeout=CONNECT_TIMEOUT,
            connect_kwargs=kwargs,
        )
        if t.known_hosts is not None:
            conn.client.load_host_keys(str(t.known_hosts))
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            conn.open()
        except paramiko.AuthenticationException as exc:
            key = f" with key {t.key_file}" if t.key_file else ""
            raise HostError(
                f"{self.name}: SSH authentication failed for {t.label}{key} ({exc}); "
                "check the user and the key in the inventory"
            ) from None
        except paramiko.BadHostKeyException:
            raise HostError(
                f"{self.name}: host key of {t.label} does not match the known one; "
                "if the host was rebuilt, remove its old key from known_hosts"
            ) from None
        except paramiko.SSHException as exc:
            raise HostError(f"{self.name}: SSH to {t.label} failed: {exc}") from None
        except TimeoutError:
            raise HostError(
                f"{self.name}: cannot reach {t.label}: no answer within {CONNECT_TIMEOUT} s; "
                "check the address, the port and the firewall/security group"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise HostError(
                f"{self.name}: cannot reach {t.label}: {reason}; "
                "check the address and that sshd is running"
            ) from None
        self._conn = conn

    def wrap(self, script: str, *, sudo: bool = True, user: str | None = None) -> str:
        """The remote command line running `script` with sh, as root (or `user`)."""
        quoted = shlex.quote(script)
        if user is not None:
            return f"sudo -n -H -u {shlex.quote(user)} -- sh -c {quoted}"
        if sudo and not self.is_root:
            return f"sudo -n -H -- sh -c {quoted}"
        return f"sh -c {quoted}"

    def run(
        self,
        script: str,
        *,
        stdin: bytes | str | None = None,
        sudo: bool = True,
        user: str | None = None,
        timeout: float | None = None,
        on_output: callable | None = None,
    ) -> RunResult:
        """Run `script` on the host; stdin carries data that must not be on a command line."""
        self.connect()
        assert self._conn is not None
        command = self.wrap(script, sudo=sudo, user=user)
        started = time.monotonic()
        with self._lock:
            self.commands += 1
        channel = self._conn.transport.open_session(timeout=CONNECT_TIMEOUT)
        if timeout:
            channel.settimeout(timeout)
        channel.exec_command(command)
        errors: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(channel.recv_stderr, errors), daemon=True)
        reader.start()
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            writer = threading.Thread(target=_feed, args=(channel, data), daemon=True)
            writer.start()
        else:
            channel.shutdown_write()
        out = _drain(channel.recv, [], on_output)
        rc = channel.recv_exit_status()
        reader.join()
        channel.close()
        return RunResult(
            rc=rc,
            stdout=out,
            stderr=b"".join(errors).decode(errors="replace"),
            seconds=time.monotonic() - started,
        )

    def check(self, script: str, what: str, **kwargs) -> RunResult:
        """`run`, raising `CommandError` (naming `what`) on a non-zero exit."""
        result = self.run(script, **kwargs)
        if not result.ok:
            raise CommandError(what, result)
        return result

    def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.join()
            self._open_error = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    try:
        channel.sendall(data)
        channel.shutdown_write()
    except OSError:
        pass


def _drain(recv, sink: list[bytes], on_output=None) -> str:
    pending = b""
    while True:
        chunk = recv(65536)
        if not chunk:
            break
        sink.append(chunk)
        if on_output is not None:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                on_output(line.decode(errors="replace"))
    if on_output is not None and pending:
        on_output(pending.decode(errors="replace"))
    return b"".join(sink).decode(errors="replace")
