"""One SSH link per host: run commands (as root through `sudo -n`), feed stdin.

The link is OpenSSH's client multiplexed over a master connection that persists between
runs (`engine.openssh`), or Paramiko when `ssh` is missing or `MLFLOW_STACK_SSH=paramiko`
(`engine.paramiko_link`); either checks the host key before anything is sent
(`engine.hostkeys`). Port forwards (`engine.forward`) use an `ssh -L` process, or Paramiko
channels (`paramiko_transport()`) when Paramiko is the link. `connect_soon()` opens the link
in the background, so the controller does other work meanwhile; the first command waits for
it. Streamed output (`on_output`) is masked (`secrets.mask`) line by line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlflow_stack.engine.link import CONNECT_TIMEOUT, HostError, Link, Target
from mlflow_stack.secrets import mask

if TYPE_CHECKING:
    import paramiko

    from mlflow_stack.engine.paramiko_link import ParamikoLink

__all__ = ["CONNECT_TIMEOUT", "CommandError", "Host", "HostError", "RunResult", "Target"]
TRANSPORT_ENV = "MLFLOW_STACK_SSH"


def use_openssh() -> bool:
    """OpenSSH's client unless `MLFLOW_STACK_SSH=paramiko` or no `ssh` is installed."""
    choice = os.environ.get(TRANSPORT_ENV, "openssh").strip().lower()
    if choice not in ("openssh", "paramiko"):
        raise HostError(f"{TRANSPORT_ENV}={choice!r}: use openssh or paramiko")
    return choice == "openssh" and shutil.which("ssh") is not None


def new_link(target: Target, name: str) -> Link:
    if use_openssh():
        from mlflow_stack.engine.openssh import OpenSshLink

        return OpenSshLink(target, name)
    from mlflow_stack.engine.paramiko_link import ParamikoLink

    return ParamikoLink(target, name)


class CommandError(HostError):
    """A remote command exited non-zero."""

    def __init__(self, what: str, result: RunResult) -> None:
        super().__init__(mask(f"{what} failed (exit {result.rc}): {result.tail(3)}"))
        self.result = result


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, lines: int = 1) -> str:
        """The last `lines` lines of stderr (else stdout) joined on one line."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-lines:]) if text else "no output"


@dataclass
class Host:
    """A host reached through one SSH link, reused for every command."""

    target: Target
    commands: int = 0
    _link: Link | None = field(default=None, repr=False)
    _forwarding: ParamikoLink | None = field(default=None, repr=False)
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
        """Start opening the link in a background thread; `connect()` waits for it."""
        if self._opening is not None or self._link is not None:
            return

        def open_it() -> None:
            try:
                self._open()
            except Exception as exc:  # raised by the `connect()` that waits for this thread
                self._open_error = exc

        self._opening = threading.Thread(target=open_it, name=f"connect {self.name}", daemon=True)
        self._opening.start()

    def connect(self) -> None:
        """Open the SSH link (once); errors become one-line `HostError`s."""
        with self._connect_lock:
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.join()
                error, self._open_error = self._open_error, None
                if error is not None:
                    raise error
            if self._link is not None and self._link.is_open:
                return
            self._open()

    def _open(self) -> None:
        link = new_link(self.target, self.name)
        link.open()
        self._link = link

    def paramiko_transport(self) -> paramiko.Transport:
        """A Paramiko transport to the host (opened on first use), for port forwards."""
        from mlflow_stack.engine.paramiko_link import ParamikoLink

        self.connect()
        with self._connect_lock:
            if isinstance(self._link, ParamikoLink):
                return self._link.transport
            if self._forwarding is None or not self._forwarding.is_open:
                forwarding = ParamikoLink(self.target, self.name)
                forwarding.open()
                self._forwarding = forwarding
            return self._forwarding.transport

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
        """Run `script` on the host; stdin carries data that must not be on a command line.

        `timeout`: stop the command after that many seconds without output (`HostError`).
        """
        command, started = self._start(script, sudo, user)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        stream = None if on_output is None else (lambda line: on_output(mask(line)))
        output = self._link.run(command, data, timeout, stream)
        self._stopped_if_silent(output.rc, timeout, "a command gave no output")
        return RunResult(output.rc, output.stdout, output.stderr, time.monotonic() - started)

    def stream(
        self,
        script: str,
        *,
        sink,
        source=None,
        sudo: bool = True,
        user: str | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        """Run `script` like `run`, but hand its stdout to `sink(chunk)` as it arrives (the
        result's stdout stays empty) and feed stdin from `source`, an iterable of byte chunks:
        for data too large to hold in memory (`engine.streams`). `timeout`: stop the command
        after that many seconds without data moving (`HostError`)."""
        command, started = self._start(script, sudo, user)
        output = self._link.stream(command, source, sink, timeout)
        self._stopped_if_silent(output.rc, timeout, "a transfer made no progress")
        return RunResult(output.rc, "", output.stderr, time.monotonic() - started)

    def _start(self, script: str, sudo: bool, user: str | None) -> tuple[str, float]:
        """Connected; the command line of `script`, counted; when it started."""
        self.connect()
        assert self._link is not None
        command = self.wrap(script, sudo=sudo, user=user)
        with self._lock:
            self.commands += 1
        return command, time.monotonic()

    def _stopped_if_silent(self, rc: int | None, timeout: float | None, what: str) -> None:
        """A link returns no exit code for a command it stopped after `timeout` s idle."""
        if rc is None:
            raise HostError(f"{self.name}: {what} for {timeout:g} s and was stopped")

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
        for link in (self._link, self._forwarding):
            if link is not None:
                link.close()
        self._link = self._forwarding = None
