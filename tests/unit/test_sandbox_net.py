"""Pure parts of the sandboxes' private network: addresses, leases, nft ruleset, files, argv."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.sandbox import base, instance, machine, network, process, render

NET = ipaddress.IPv4Network("10.77.0.0/24")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(base.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(base.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(network.NET_DIR_ENV, str(tmp_path / "net"))
    monkeypatch.delenv(network.SUBNET_ENV, raising=False)
    monkeypatch.delenv(base.NETWORK_ENV, raising=False)


def test_subnet_default_and_override(monkeypatch):
    assert network.subnet() == NET
    assert str(network.gateway(NET)) == "10.77.0.1"
    monkeypatch.setenv(network.SUBNET_ENV, "10.88.5.0/24")
    assert str(network.subnet()) == "10.88.5.0/24"
    for bad in ("nonsense", "8.8.8.0/24", "10.0.0.0/8"):
        monkeypatch.setenv(network.SUBNET_ENV, bad)
        with pytest.raises(sb.SandboxError, match=network.SUBNET_ENV):
            network.subnet()


def test_addresses_names_and_macs():
    hosts = network.host_addresses(NET)
    assert str(hosts[0]) == "10.77.0.2" and str(hosts[-1]) == "10.77.0.254" and len(hosts) == 253
    last = network.index_of(hosts[-1], NET)
    assert network.veth_name(last) == "mlfs-254" and len(network.veth_name(last)) <= 15
    assert network.netns_name(7) == "mlfstack-7"
    assert network.mac_of(ipaddress.IPv4Address("10.77.0.7")) == "02:6d:66:4d:00:07"
    assert len(network.BRIDGE) <= 15


@pytest.mark.parametrize("bad", ["10.77.0.1", "10.77.0.0", "10.77.0.255", "10.78.0.2", "x"])
def test_only_sandbox_addresses_can_be_asked_for(bad):
    with pytest.raises(sb.SandboxError, match="address"):
        network.check_address(bad, NET)


def test_nft_ruleset_touches_only_the_subnet():
    text = network.nft_ruleset(NET, ("10.255.255.53",))
    assert text.startswith("table ip mlflow_stack_sandbox\ndelete table ip mlflow_stack_sandbox\n")
    rules = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ip ")]
    closed = "169.254.0.0/16, 100.64.0.0/10, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16"
    assert rules == [
        "ip saddr 10.77.0.0/24 ip daddr 10.77.0.0/24 accept",
        "ip saddr 10.77.0.0/24 ip daddr 10.255.255.53 udp dport 53 accept",
        "ip saddr 10.77.0.0/24 ip daddr 10.255.255.53 tcp dport 53 accept",
        # the metadata service and the private networks around the machine: never
        f"ip saddr 10.77.0.0/24 ip daddr {{ {closed} }} reject",
        "ip saddr 10.77.0.0/24 accept",
        "ip daddr 10.77.0.0/24 ct state established,related accept",
        "ip daddr 10.77.0.0/24 drop",
        "ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade",
    ]
    assert "policy accept" in text and "policy drop" not in text


def test_resolvers_are_the_controllers_non_loopback_ipv4_ones():
    text = "nameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver fd00::1\nsearch x\n"
    assert network.resolvers(text) == ("10.255.255.53",)


def test_resolv_conf_keeps_reachable_resolvers():
    text = network.resolv_conf("# x\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nsearch a b\n")
    assert text.splitlines()[1:] == ["search a b", "nameserver 10.255.255.53"]
    with pytest.raises(sb.SandboxError, match="loopback"):
        network.resolv_conf("nameserver 127.0.0.53\n")


def test_overlapping_routes_are_found():
    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"dst": "192.0.2.0/24", "dev": "eth0"},
        {"dst": "10.77.0.0/24", "dev": "mlfstack0"},
        {"dst": "10.0.0.0/8", "dev": "tun0"},
        {"dst": "fd00::/64", "dev": "eth0"},
    ]
    assert network.overlapping_routes(routes, NET) == ["10.0.0.0/8 dev tun0"]
    assert network.overlapping_routes(routes[:3], NET) == []


def make_instance(name: str, address: str | None, pid: int | None = None) -> Path:
    state = sb.instance_dir(name)
    state.mkdir(parents=True)
    meta = {"name": name, "network": "private", "address": address, "port": 22, "pid": pid}
    machine.write_meta(state, meta)
    return state


def lease(state: Path, wanted: str | None = None) -> str:
    with network.lock():
        address = str(network.allocate(state, state.name, wanted, NET))
    machine.write_meta(state, {**machine.read_meta(state), "address": address})
    return address


def test_leases_are_first_free_and_follow_the_instance():
    a, b = make_instance("a", None), make_instance("b", None)
    assert lease(a) == "10.77.0.2"
    assert lease(b) == "10.77.0.3"
    assert network.holder(ipaddress.IPv4Address("10.77.0.2")).name == "a"
    machine.write_meta(a, {"name": "a", "address": None})  # its record moved on: stale lease
    assert network.holder(ipaddress.IPv4Address("10.77.0.2")) is None
    c = make_instance("c", None)
    assert lease(c) == "10.77.0.2"
    with network.lock():
        network.release(b, "10.77.0.3")
        network.release(a, "10.77.0.2")  # not a's any more: kept
    assert [str(x) for x in network.leases()] == ["10.77.0.2"]


def test_leases_are_machine_wide_across_state_roots(monkeypatch, tmp_path):
    first = make_instance("a", None)
    assert lease(first) == "10.77.0.2"
    monkeypatch.setenv(base.STATE_ENV, str(tmp_path / "other-state"))
    assert lease(make_instance("a", None)) == "10.77.0.3"


def test_a_stopped_holders_address_can_be_asked_for_a_running_ones_not(monkeypatch):
    a = make_instance("a", None)
    address = lease(a)
    b = make_instance("b", None)
    assert lease(b, address) == address  # a is stopped (kept): b takes its address
    assert network.holder(ipaddress.IPv4Address(address)).name == "b"
    monkeypatch.setattr(process, "is_nspawn_of", lambda pid, state: True)
    machine.write_meta(b, {**machine.read_meta(b), "pid": 4242})
    with pytest.raises(sb.SandboxError, match="in use by running sandbox b"):
        lease(a, address)


def test_spec_defaults_to_private_port_22():
    spec = machine.resolve_spec("x", {})
    assert (spec.network, spec.port, spec.address, spec.distro) == ("private", 22, None, "bookworm")
    assert machine.resolve_spec("x", {}, address="10.77.0.9").address == "10.77.0.9"
    assert machine.resolve_spec("x", {}, port=22).network == "private"


def test_spec_of_the_older_call_and_of_host_mode(monkeypatch):
    assert machine.resolve_spec("x", {}, port=2299).network == "host"  # up(name, port)
    spec = machine.resolve_spec("x", {}, network="host")
    assert (spec.address, spec.port) == ("127.0.0.1", 2222)
    with pytest.raises(sb.SandboxError, match="--port is for --network host"):
        machine.resolve_spec("x", {}, network="private", port=2299)
    with pytest.raises(sb.SandboxError, match="--address is for --network private"):
        machine.resolve_spec("x", {}, network="host", address="10.77.0.5")
    with pytest.raises(sb.SandboxError, match="unknown network"):
        machine.resolve_spec("x", {}, network="bridge")
    monkeypatch.setenv(base.NETWORK_ENV, "host")
    assert machine.resolve_spec("x", {}).network == "host"


def test_spec_of_a_kept_instance_is_its_record():
    recorded = {"network": "private", "address": "10.77.0.9", "port": 22, "distro": "sid",
                "cpus": 1, "memory": 2**30}  # fmt: skip
    spec = machine.resolve_spec("x", recorded)
    assert (spec.address, spec.distro, spec.cpus, spec.memory) == ("10.77.0.9", "sid", 1, 2**30)
    assert machine.resolve_spec("x", recorded, memory="512M").memory == 2**29  # resized
    with pytest.raises(sb.SandboxError, match="was made with --network private"):
        machine.resolve_spec("x", recorded, network="host")
    with pytest.raises(sb.SandboxError, match="is a sid host"):
        machine.resolve_spec("x", recorded, distro="bookworm")
    old = machine.resolve_spec("x", {"port": 2201, "pid": None})  # made by an older version
    assert (old.network, old.port, old.distro) == ("host", 2201, "bookworm")


def test_cpus_are_checked_and_spread():
    assert machine.check_cpus(1, available=2) == 1
    with pytest.raises(sb.SandboxError, match="can give 1 to 2"):
        machine.check_cpus(3, available=2)
    assert machine.cpu_set(1, 2, [0, 1]) == [0]
    assert machine.cpu_set(1, 3, [0, 1]) == [1]
    assert machine.cpu_set(2, 3, [0, 1]) == [0, 1]
    assert machine.cpu_set(2, 0, [0, 2, 4, 6]) == [0, 2]


def test_private_boot_command_joins_the_namespace():
    argv = machine.nspawn_argv(Path("/c/base"), Path("/s/upper"), "demo",
                               netns=Path("/run/netns/mlfstack-5"), cpus=[1])  # fmt: skip
    assert "--network-namespace-path=/run/netns/mlfstack-5" in argv
    assert "--resolv-conf=off" in argv and "--cpu-affinity=1" in argv
    plain = machine.nspawn_argv(Path("/c/base"), Path("/s/upper"), "demo")
    assert not [a for a in plain if a.startswith(("--network", "--resolv", "--cpu"))]


def test_private_instance_files(tmp_path):
    base_dir, state = tmp_path / "base", tmp_path / "state"
    (base_dir / "etc/ssh").mkdir(parents=True)
    (state / instance.UPPER / "etc/ssh").mkdir(parents=True)
    (state / instance.UPPER / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA x\n")
    resolv = "nameserver 10.255.255.53\n"
    instance.set_address(state, base_dir, "demo", "10.77.0.5", 22, resolv)
    upper = state / instance.UPPER
    assert "ListenAddress 10.77.0.5\nPort 22\n" in (upper / "etc/ssh/sshd_config").read_text()
    assert "10.77.0.5\tdemo\n" in (upper / "etc/hosts").read_text()
    assert (upper / "etc/resolv.conf").read_text() == resolv
    assert (state / "known_hosts").read_text() == "10.77.0.5 ssh-ed25519 AAAA\n"
    assert "    HostName 10.77.0.5\n    Port 22\n" in (state / "ssh_config").read_text()
    assert "127.0.1.1\tdemo\n" in render.hosts("demo")  # shared network: Debian's default


def test_info_of_a_private_instance(tmp_path):
    meta = {"address": "10.77.0.5", "port": 22}
    info = machine._info(tmp_path / "demo", meta, 1)
    assert info.host_string == "ubuntu@10.77.0.5:22"
    assert info.ssh_command("true")[-3:] == ["ubuntu@10.77.0.5", "--", "true"]
    assert machine._info(tmp_path / "x", {"port": 2201}, 1).address == "127.0.0.1"


def test_status_reports_network_and_size(tmp_path):
    state = make_instance("demo", "10.77.0.5")
    machine.write_meta(state, {**machine.read_meta(state), "memory": 2**30, "cpus": 1})
    facts = sb.status("demo")
    assert (facts["network"], facts["address"], facts["memory"], facts["cpus"]) == (
        "private", "10.77.0.5", "1G", 1)  # fmt: skip
    assert facts["oom_kills"] is None and not facts["running"]
    assert sb.oom_kills("demo") is None
    assert json.dumps(facts)
