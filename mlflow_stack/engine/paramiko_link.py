"""SSH through Paramiko (via Fabric): one connection, one channel per command.

Used for port forwarding (`engine.forward`), and for commands when OpenSSH's client is not
installed or `MLFLOW_STACK_SSH=paramiko`. Paramiko and Fabric are imported by `open()`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from mlflow_stack.engine.link import CONNECT_TIMEOUT, HostError, Output, Target, unreachable

if TYPE_CHECKING:
    import paramiko
    from fabric import Connection


class ParamikoLink:
    """A Fabric connection to one target, opened once."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self._conn: Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.is_connected

    @property
    def transport(self) -> paramiko.Transport:
        """The open connection's transport (for `direct-tcpip` channels)."""
        assert self._conn is not None and self._conn.transport is not None
        return self._conn.transport

    def open(self) -> None:
        """Connect and authenticate; failures raise `HostError` with a one-line message."""
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
            raise HostError(unreachable(self.name, t, None)) from None
        except OSError as exc:
            raise HostError(unreachable(self.name, t, exc.strerror or str(exc))) from None
        self._conn = conn

    def run(self, command: str, stdin: bytes | None, timeout: float | None, on_output) -> Output:
        """Run `command` on a new channel; `timeout`: at most that long without output."""
        channel = self.transport.open_session(timeout=CONNECT_TIMEOUT)
        if timeout:
            channel.settimeout(timeout)
        channel.exec_command(command)
        errors: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(channel.recv_stderr, errors), daemon=True)
        reader.start()
        if stdin is not None:
            writer = threading.Thread(target=_feed, args=(channel, stdin), daemon=True)
            writer.start()
        else:
            channel.shutdown_write()
        try:
            out = _drain(channel.recv, [], on_output)
        except TimeoutError:
            channel.close()
            return Output(None, "", b"".join(errors).decode(errors="replace"))
        rc = channel.recv_exit_status()
        reader.join()
        channel.close()
        return Output(rc, out, b"".join(errors).decode(errors="replace"))

    def stream(self, command: str, source, sink, timeout: float | None) -> Output:
        """Run `command`, stdin from `source`, stdout to `sink` (`engine.streams`)."""
        from mlflow_stack.engine import streams

        channel = self.transport.open_session(timeout=CONNECT_TIMEOUT)
        channel.exec_command(command)
        return streams.pump_channel(channel, source, sink, timeout)

    def close(self) -> None:
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
