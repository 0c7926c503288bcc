"""Private network of the sandboxes, over real SSH: address:22 with the pinned key, loopback
services out of the controller's reach, NAT out to PyPI and Debian, sandboxes reaching each
other, an impostor on a stopped host's address, and the bridge and NAT gone with the last one."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.sandbox import network

pytestmark = pytest.mark.e2e


def boot(**kwargs) -> sb.SandboxInfo:
    """A new pristine private sandbox owned by this pytest process (see conftest's OWNER)."""
    info = sb.up(f"e2e-{uuid.uuid4().hex[:10]}", **kwargs)
    (info.state_dir / "e2e-owner").write_text(f"{os.getpid()}\n")
    return info


def sh(client: paramiko.SSHClient, command: str, timeout: float = 60) -> sb.Result:
    result = sb.exec_command(client, command, timeout)
    assert result.rc == 0, f"{command!r} exited {result.rc}: {result.stderr.strip()}"
    return result


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[sb.SandboxInfo, sb.SandboxInfo]]:
    """Two private sandboxes for the module; always removed."""
    made: list[sb.SandboxInfo] = []
    try:
        made.append(boot())
        made.append(boot())
        yield made[0], made[1]
    finally:
        for info in made:
            sb.down(info.name)


@pytest.fixture(scope="module")
def clients(pair) -> Iterator[tuple[paramiko.SSHClient, paramiko.SSHClient]]:
    a, b = sb.connect(pair[0]), sb.connect(pair[1])
    yield a, b
    a.close()
    b.close()


def test_ssh_on_port_22_of_a_private_address_with_the_pinned_key(pair, clients):
    a, b = pair
    net = network.subnet()
    assert a.port == b.port == 22 and a.address != b.address
    assert {ipaddress.IPv4Address(a.address), ipaddress.IPv4Address(b.address)} <= set(net)
    assert a.known_hosts.read_text().split()[0] == a.address  # port 22: the plain address
    assert sh(clients[0], "hostname").stdout.strip() == a.name
    assert sh(clients[0], "ip -4 -o addr show dev eth0").stdout.split()[3] == f"{a.address}/24"
    assert sh(clients[0], "getent hosts $(hostname)").stdout.split()[0] == a.address
    assert sh(clients[0], "sudo -n true").stderr == ""
    proc = subprocess.run(a.ssh_command("hostname"), capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, a.name)
    stranger = dataclasses.replace(a, known_hosts=b.known_hosts)  # b's key pinned for b only
    with pytest.raises(paramiko.SSHException):
        sb.connect(stranger).close()
    facts = sb.status(a.name)
    assert (facts["network"], facts["address"], facts["port"]) == ("private", a.address, 22)
    assert a in sb.list_sandboxes() and sb.load(a.name) == a


def test_loopback_services_are_the_sandboxs_own(pair, clients):
    a, _ = pair
    sh(clients[0], "sudo -n systemd-run --unit e2e-lo python3 -m http.server 8765 --bind 127.0.0.1")
    sh(clients[0], "for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:8765 && exit 0; "
                   "sleep 0.1; done; exit 1", timeout=30)  # fmt: skip
    for target in (a.address, "127.0.0.1"):
        with socket.socket() as sock:
            sock.settimeout(3)
            assert sock.connect_ex((target, 8765)) != 0, f"{target}:8765 answered"


def test_sandboxes_reach_each_other(pair, clients):
    a = pair[0]
    sh(clients[0], "sudo -n systemd-run --unit e2e-any python3 -m http.server 8766 --bind 0.0.0.0")
    code = sh(clients[1], f"for i in $(seq 50); do curl -s -o /dev/null -w '%{{http_code}}' "
                          f"http://{a.address}:8766/ && exit 0; sleep 0.1; done; exit 1",
              timeout=30).stdout  # fmt: skip
    assert code.endswith("200")  # '000' for each try before the server listened
    sh(clients[1], f"timeout 5 bash -c 'echo > /dev/tcp/{a.address}/22'")


def test_pypi_over_https_and_apt_through_nat(clients):
    code = sh(clients[0], "curl -sS --max-time 30 -o /dev/null -w '%{http_code}' "
                          "https://pypi.org/simple/pip/").stdout  # fmt: skip
    assert code == "200"
    sh(clients[1], "sudo -n apt-get update -qq", timeout=180)
    assert "nameserver" in sh(clients[0], "cat /etc/resolv.conf").stdout


def test_an_impostor_on_a_stopped_hosts_address(pair):
    first = boot()
    try:
        with pytest.raises(sb.SandboxError, match=f"in use by running sandbox {pair[0].name}"):
            sb.up("e2e-never-booted", address=pair[0].address)
        assert not sb.instance_dir("e2e-never-booted").exists()
        sb.down(first.name, keep=True)
        impostor = boot(address=first.address)
        try:
            assert (impostor.address, impostor.port) == (first.address, 22)
            assert sb.run(impostor, "hostname").stdout.strip() == impostor.name
            with pytest.raises(paramiko.BadHostKeyException):  # first's pinned key refuses it
                sb.connect(first).close()
            with pytest.raises(sb.SandboxError, match=f"in use by running sandbox {impostor.name}"):
                sb.up(first.name)  # the kept host cannot come back while its address is taken
        finally:
            sb.down(impostor.name)
        again = sb.up(first.name)  # kept: its own address and key again
        assert again.address == first.address
        assert sb.run(again, "hostname").stdout.strip() == first.name
    finally:
        sb.down(first.name)


def test_bridge_and_nat_go_with_the_last_sandbox(pair):
    """The pair's own namespaces and links go with them; the bridge, NAT table and forwarding
    go with the last sandbox on the machine (while others run they stay, for those). The suite
    itself ends with the last sandbox gone, and conftest checks then that they went too."""
    if not Path(f"/sys/class/net/{network.BRIDGE}").exists():
        pytest.fail(f"bridge {network.BRIDGE} missing while sandboxes run")
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    indexes = [network.index_of(ipaddress.ip_address(i.address), network.subnet()) for i in pair]
    for info in pair:
        sb.down(info.name)
    for index in indexes:
        assert not Path(f"/run/netns/{network.netns_name(index)}").exists()
        assert not Path(f"/sys/class/net/{network.veth_name(index)}").exists()
    with network.lock():  # no sandbox of another test process comes or goes meanwhile
        others = [a for a in network.leases() if (h := network.holder(a)) and h.running]
        if others:  # still needed by the sandboxes that run
            assert Path(f"/sys/class/net/{network.BRIDGE}").exists() and network.table_exists()
            assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
            return
        assert_network_gone()


def assert_network_gone() -> None:
    """No bridge, NAT table, namespaces or saved forwarding state left behind."""
    assert not Path(f"/sys/class/net/{network.BRIDGE}").exists()
    assert not network.table_exists()
    assert not list(Path("/run/netns").glob(f"{network.NETNS_PREFIX}*"))
    assert not (network.net_dir() / "ip_forward.saved").exists()
