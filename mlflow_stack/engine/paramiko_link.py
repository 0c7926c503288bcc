"""SSH through Paramiko (via Fabric): one connection, one channel per command.

Used when OpenSSH's client is not installed or `MLFLOW_STACK_SSH=paramiko` (commands and port
forwards alike). Paramiko and Fabric are imported by `open()`. Host keys get the policy of
`engine.hostkeys`, as the OpenSSH link does: the known keys of the host (from the files the
inventory or `~/.ssh/config` name) are loaded into the client, so a changed key is refused;
an unknown one goes to `hostkeys.check_offered` (pinned, strict, accept-new, off).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from mlflow_stack.engine import hostkeys
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
        """Connect, check the host key (before authenticating) and authenticate; failures
        raise `HostError` with a one-line message."""
        import paramiko
        from fabric import Connection

        t = self.target
        hostkeys.warn_if_off(self.name, t)
        check = hostkeys.settings(t, user_ssh_config(t))
        kwargs: dict = {"look_for_keys": t.key_file is None, "banner_timeout": CONNECT_TIMEOUT}
        if t.key_file is not None:
            kwargs["key_filename"] = [str(t.key_file)]
        algorithms = hostkeys.pinned_algorithms(check.pins)
        if algorithms:  # ask for a pinned key type (as ssh's HostKeyAlgorithms does)
            others = [k for k in paramiko.Transport._preferred_keys if k not in algorithms]
            kwargs["disabled_algorithms"] = {"keys": others}
        conn = Connection(
            t.address,
            user=t.user,
            port=t.port,
            connect_timeout=CONNECT_TIMEOUT,
            connect_kwargs=kwargs,
        )
        known = prepare_client(conn.client, self.name, t, check)
        try:
            conn.open()
        except hostkeys.HostKeyError:
            conn.close()
            raise
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise hostkeys.HostKeyError(changed_message(self.name, t, check, known, exc)) from None
        except paramiko.AuthenticationException as exc:
            conn.close()
            key = f" with key {t.key_file}" if t.key_file else ""
            raise HostError(
                f"{self.name}: SSH authentication failed for {t.label}{key} ({exc}); "
                "check the user and the key in the inventory"
            ) from None
        except paramiko.SSHException as exc:
            conn.close()
            raise HostError(f"{self.name}: SSH to {t.label} failed: {exc}") from None
        except TimeoutError:
            conn.close()
            raise HostError(unreachable(self.name, t, None)) from None
        except OSError as exc:
            conn.close()
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


def user_ssh_config(target: Target) -> dict:
    """The `~/.ssh/config` entry of the target (lower-cased keys), as Paramiko reads it."""
    import paramiko

    path = hostkeys.home() / ".ssh/config"
    if not path.exists():
        return {}
    try:
        config = paramiko.SSHConfig.from_path(str(path))
    except (OSError, paramiko.SSHException):
        return {}
    return dict(config.lookup(target.ssh_host or target.address))


def prepare_client(client, name: str, target: Target, check: hostkeys.Settings) -> list:
    """Give the client exactly the known keys of the host and our policy for unknown ones;
    the known keys (to name them when the host offers another)."""
    import paramiko

    client._system_host_keys = paramiko.HostKeys()
    client._host_keys = paramiko.HostKeys()
    known: list[hostkeys.KnownKey] = []
    if check.policy in ("strict", "accept-new"):
        server_name = hostkeys.lookup_name(target.address, target.port)
        known = [k for k in hostkeys.known_keys(check, check.lookup(target)) if not k.marker]
        for k in known:
            try:
                key = paramiko.PKey.from_type_string(k.key_type, k.blob)
            except (paramiko.SSHException, ValueError):
                continue
            client._host_keys.add(server_name, k.key_type, key)
    client.set_missing_host_key_policy(_Policy(name, target, check))
    return known


def changed_message(name, target: Target, check: hostkeys.Settings, known: list, exc) -> str:
    """The refusal for a key that differs from the known one (Paramiko's BadHostKey)."""
    import base64

    offered_blob, expected_blob = exc.key.asbytes(), exc.expected_key.asbytes()
    expected_data = base64.b64encode(expected_blob).decode()
    source = next((k.source for k in known if k.data == expected_data), "")
    return hostkeys.refusal(
        name,
        target.label,
        "has changed",
        hostkeys.describe(hostkeys.fingerprint(offered_blob), exc.key.get_name()),
        hostkeys.describe(hostkeys.fingerprint(expected_blob), exc.expected_key.get_name(), source),
        hostkeys.changed_fix(check.lookup(target), source.rsplit(":", 1)[0] or "known_hosts"),
    )


class _Policy:
    """Paramiko's missing-host-key hook: the host has no known key (or is pinned)."""

    def __init__(self, name: str, target: Target, check: hostkeys.Settings) -> None:
        self.name, self.target, self.check = name, target, check

    def missing_host_key(self, client, hostname: str, key) -> None:
        import base64

        data = base64.b64encode(key.asbytes()).decode()
        _, add = hostkeys.check_offered(self.name, self.target, self.check, key.get_name(), data)
        if add:
            hostkeys.append_known_host(
                self.check.user_files[0], self.check.lookup(self.target), key.get_name(), data
            )
