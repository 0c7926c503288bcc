"""The sandbox host itself, over real SSH: systemd, sudo, HTTPS, restarts, up/down lifecycle.

The module's own `sandbox` and `fresh_sandbox` fixtures boot private sandboxes (the default
network); conftest's boot sandboxes on the shared host network with a port (the older call).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from mlflow_stack import sandbox as sb

pytestmark = pytest.mark.e2e


def boot(**kwargs) -> sb.SandboxInfo:
    """A new pristine sandbox owned by this pytest process (see conftest's OWNER)."""
    info = sb.up(f"e2e-{uuid.uuid4().hex[:10]}", **kwargs)
    (info.state_dir / "e2e-owner").write_text(f"{os.getpid()}\n")
    return info


@pytest.fixture(scope="module")
def sandbox() -> Iterator[sb.SandboxInfo]:
    """A private sandbox for the module (overrides conftest's session one)."""
    info = boot()
    try:
        yield info
    finally:
        sb.down(info.name)


@pytest.fixture
def fresh_sandbox() -> Iterator[Callable[[], sb.SandboxInfo]]:
    """Factory of extra pristine private sandboxes, removed after the test."""
    made: list[str] = []

    def make() -> sb.SandboxInfo:
        info = boot()
        made.append(info.name)
        return info

    try:
        yield make
    finally:
        for name in made:
            sb.down(name)


@pytest.fixture(scope="module")
def client(sandbox: sb.SandboxInfo) -> Iterator[paramiko.SSHClient]:
    """One SSH connection (key auth, pinned host key) shared by the module."""
    conn = sb.connect(sandbox)
    yield conn
    conn.close()


def sh(client: paramiko.SSHClient, command: str, timeout: float = 60) -> sb.Result:
    """Run `command` and require exit 0."""
    result = sb.exec_command(client, command, timeout)
    assert result.rc == 0, f"{command!r} exited {result.rc}: {result.stderr.strip()}"
    return result


def wait_for(predicate, timeout: float = 15.0, step: float = 0.2):
    """Poll `predicate` until it returns a truthy value; that value, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"condition not met within {timeout} s")


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_systemd_is_pid1_and_the_system_is_running(client):
    assert sh(client, "cat /proc/1/comm").stdout.strip() == "systemd"
    assert sh(client, "systemctl is-system-running").stdout.strip() == "running"


def test_login_user_has_passwordless_sudo_and_a_resolvable_hostname(client, sandbox):
    assert sh(client, "id -un").stdout.strip() == "ubuntu"
    sudo = sh(client, "sudo -n true")
    assert sudo.stderr == ""  # no "unable to resolve host"
    assert sh(client, "hostname").stdout.strip() == sandbox.name
    assert sh(client, "getent hosts $(hostname)").stdout.split()[0] == sandbox.address
    assert sh(client, "sudo -n id -u").stdout.strip() == "0"


def test_https_to_pypi_through_the_copied_ca_certificates(client):
    sh(client, "curl -sSf --max-time 30 https://pypi.org/simple/pip/ -o /dev/null")
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert sh(client, "echo $SSL_CERT_FILE").stdout.strip() == bundle
    assert sh(client, "sudo -n sh -c 'echo $SSL_CERT_FILE'").stdout.strip() == bundle
    sh(
        client,
        "python3 -c \"import urllib.request as u; u.urlopen('https://pypi.org/simple/pip/', "
        'timeout=30).read(1)"',
    )


def test_a_killed_unit_is_restarted(client):
    unit = "e2e-sleeper.service"
    text = (
        "[Unit]\nDescription=e2e restart probe\n[Service]\nExecStart=/bin/sleep infinity\n"
        "Restart=on-failure\nRestartSec=200ms\n"
    )
    sh(client, f"printf '{text}' | sudo -n tee /etc/systemd/system/{unit} >/dev/null")
    sh(client, f"sudo -n systemctl daemon-reload && sudo -n systemctl start {unit}")

    def main_pid() -> int:
        out = sh(client, f"systemctl show -p MainPID --value {unit}").stdout
        return int(out.strip() or 0)

    first = wait_for(main_pid)
    sh(client, f"sudo -n kill -9 {first}")
    second = wait_for(lambda: (p := main_pid()) not in (0, first) and p)
    assert second != first
    assert sh(client, f"systemctl is-active {unit}").stdout.strip() == "active"
    sh(client, f"sudo -n systemctl stop {unit} && sudo -n rm /etc/systemd/system/{unit}")


def test_host_key_is_pinned(sandbox, tmp_path):
    other = tmp_path / "known_hosts"
    other.write_text("")
    stranger = dataclasses.replace(sandbox, known_hosts=other)
    with pytest.raises(paramiko.SSHException):
        sb.connect(stranger).close()
    assert oct(sandbox.key_file.stat().st_mode & 0o777) == "0o600"
    argv = sandbox.ssh_command("hostname")  # the OpenSSH client path of `invoke sandbox.ssh`
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, sandbox.name)


def test_up_of_a_running_sandbox_is_a_no_op(sandbox):
    started = time.monotonic()
    again = sb.up(sandbox.name, sandbox.port)
    assert again == sandbox
    assert time.monotonic() - started < 5
    assert sandbox in sb.list_sandboxes()
    facts = sb.status(sandbox.name)
    assert facts["running"] and facts["pid"] == sandbox.pid and facts["port"] == sandbox.port
    assert facts["system_state"] == "running"


def test_up_on_a_busy_port_fails_clearly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(sb.SandboxError, match=rf"port {port} on 127.0.0.1 is in use"):
            sb.up("e2e-busy-port", port, network="host")
    assert not sb.instance_dir("e2e-busy-port").exists()


def test_the_shared_host_network_mode_still_works():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed
    info = boot(port=port, network="host")
    try:
        assert (info.address, info.port) == ("127.0.0.1", port)
        assert sb.run(info, "hostname").stdout.strip() == info.name
        assert sb.run(info, "getent hosts $(hostname)").stdout.split()[0] == "127.0.1.1"
        assert sb.status(info.name)["network"] == "host"
    finally:
        sb.down(info.name)


def test_down_stops_the_container_and_removes_its_state(fresh_sandbox, sandbox, client):
    info = fresh_sandbox()
    assert not pid_gone(info.pid)
    own_id = sb.run(info, "cat /etc/machine-id").stdout
    assert own_id != sh(client, "cat /etc/machine-id").stdout  # fresh per instance
    started = time.monotonic()
    assert sb.down(info.name) is True
    assert time.monotonic() - started < 60
    assert pid_gone(info.pid)
    assert not info.state_dir.exists()
    assert sb.load(info.name) is None
    assert sb.down(info.name) is False
    assert sb.ssh.banner(info.address, 22) is None  # its address answers no more


def test_a_kept_sandbox_boots_again_with_its_changes(fresh_sandbox):
    info = fresh_sandbox()
    sb.run(info, "sudo -n touch /etc/e2e-marker")
    assert sb.down(info.name, keep=True) is True
    assert pid_gone(info.pid) and sb.load(info.name) is None
    again = sb.up(info.name)
    assert again.pid != info.pid and again.address == info.address
    assert sb.run(again, "test -e /etc/e2e-marker").rc == 0
    base = Path(str(sb.status(info.name)["base"]))
    assert (base / "etc/os-release").exists()
    assert not (base / "etc/e2e-marker").exists()  # changes land in the instance's own layer
