"""The sandboxes' private network: one bridge, one subnet, NAT out, like hosts on a VPC.

Layout (machine-wide, whatever $MLFLOW_STACK_STATE a session uses):

- Bridge `mlfstack0` on the controller holds the gateway, `.1` of SUBNET (10.77.0.0/24 unless
  $MLFLOW_STACK_SANDBOX_SUBNET says otherwise; every process on the machine must agree).
- Each sandbox gets a network namespace `mlfstack-<n>` made here, holding `eth0` (one end of a
  veth pair, MAC derived from the address) with `10.77.0.<n>/24` and a default route via the
  gateway; the other end, `mlfs-<n>`, is a port of the bridge. systemd-nspawn joins that
  namespace with `--network-namespace-path=`.
- nftables table `ip mlflow_stack_sandbox`: masquerade of the subnet going anywhere but the
  subnet, forwarding of the subnet's traffic, nothing new forwarded into the subnet. Every rule
  matches the subnet; nothing else on the machine is touched. `net.ipv4.ip_forward` is set to 1
  while a sandbox runs (the previous value is saved and put back).
- Leases: `<NET_DIR>/leases/<address>` name the instance (its state dir) that holds an
  address, allocated under `<NET_DIR>/.lock`. A lease counts while its instance's instance.json
  records that address, so stale leases of deleted instances free themselves.

Why our own namespace rather than nspawn's `--network-bridge=` or `--network-interface=`
(each tried on this machine, systemd 252):

- `--network-interface=` refuses here: "Network interface … is not initialized yet" (it asks
  udev, which does not run on a controller whose PID 1 is not systemd).
- `--network-bridge=` works (boot to sshd ≈ 1.5 s either way), but names the host end
  `vb-<machine name>`, shortened with a hash past 15 characters (`vb-e2e-0123456789` became
  `vb-e2e-0123zzkz`), and the container's capability set has no CAP_NET_ADMIN here, so the
  address and routes must be set from outside after nspawn made the link: a race.
- Our namespace is configured completely before the container starts (no unit inside, the same
  for every suite), its names follow the lease (`mlfs-<n>`, ≤ 15 characters, never two alike),
  the container sees a plain `eth0`, and `down` removes exactly what `up` made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .base import SandboxError, which
from .rootfs import first_line, locked

log = logging.getLogger("mlflow_stack.sandbox")

SUBNET_ENV = "MLFLOW_STACK_SANDBOX_SUBNET"
DEFAULT_SUBNET = "10.77.0.0/24"
NET_DIR_ENV = "MLFLOW_STACK_NET_DIR"  # for tests: every process on a machine must share it
DEFAULT_NET_DIR = Path("/var/lib/mlflow-stack-network")
BRIDGE = "mlfstack0"
NFT_TABLE = "mlflow_stack_sandbox"
NETNS_PREFIX = "mlfstack-"
VETH_PREFIX = "mlfs-"
MAC_PREFIX = "02:6d:66"  # locally administered, "mf"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
NETNS_DIR = Path("/run/netns")


def subnet() -> ipaddress.IPv4Network:
    """The sandboxes' subnet ($MLFLOW_STACK_SANDBOX_SUBNET or 10.77.0.0/24)."""
    text = os.environ.get(SUBNET_ENV) or DEFAULT_SUBNET
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise SandboxError(f"${SUBNET_ENV}={text!r} is not an IPv4 subnet: {exc}") from None
    if not net.is_private or not 24 <= net.prefixlen <= 28:
        raise SandboxError(f"${SUBNET_ENV}={text}: use a private subnet from /24 to /28")
    return net


def gateway(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The controller's address on the bridge: the subnet's first host."""
    return net.network_address + 1


def host_addresses(net: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    """Addresses a sandbox can get: every host of the subnet but the gateway."""
    return [a for a in net.hosts() if a != gateway(net)]


def index_of(address: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> int:
    """Position of `address` in the subnet (10.77.0.7 -> 7): names its namespace and veth."""
    return int(address) - int(net.network_address)


def netns_name(index: int) -> str:
    return f"{NETNS_PREFIX}{index}"


def veth_name(index: int) -> str:
    """Host end of the sandbox's veth pair (≤ 15 characters for any /24 index)."""
    return f"{VETH_PREFIX}{index}"


def mac_of(address: ipaddress.IPv4Address) -> str:
    """A fixed MAC per address, so a new sandbox on a reused address needs no new ARP entry."""
    b = address.packed
    return f"{MAC_PREFIX}:{b[1]:02x}:{b[2]:02x}:{b[3]:02x}"


def check_address(text: str, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """`text` as a sandbox address of `net`, or SandboxError naming what is allowed."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise SandboxError(f"invalid address {text!r}: give an IPv4 address in {net}") from None
    allowed = host_addresses(net)
    if address not in allowed:
        raise SandboxError(
            f"address {address} is not a sandbox address: pick one of {allowed[0]}-{allowed[-1]}"
        )
    return address


# Where a sandbox must never send anything: the metadata service an IMDS lookup would reach
# (169.254.169.254 on EC2) and every private network of the machine's own surroundings.
# Sandboxes reach each other, their DNS resolvers and the public registries; nothing else.
CLOSED = ("169.254.0.0/16", "100.64.0.0/10", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


def nft_ruleset(
    net: ipaddress.IPv4Network, resolvers: tuple[str, ...] = (), table: str = NFT_TABLE
) -> str:
    """The whole nftables table, replaced atomically (`nft -f`): every rule names the subnet."""
    dns = "".join(
        f"    ip saddr {net} ip daddr {r} {proto} dport 53 accept\n"
        for r in resolvers
        for proto in ("udp", "tcp")
    )
    return (
        f"table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    ip saddr {net} ip daddr {net} accept\n"
        f"{dns}"
        f"    ip saddr {net} ip daddr {{ {', '.join(CLOSED)} }} reject\n"
        f"    ip saddr {net} accept\n"
        f"    ip daddr {net} ct state established,related accept\n"
        f"    ip daddr {net} drop\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {net} ip daddr != {net} masquerade\n"
        "  }\n"
        "}\n"
    )


def resolvers(text: str | None = None) -> tuple[str, ...]:
    """The controller's non-loopback IPv4 resolvers (from /etc/resolv.conf)."""
    if text is None:
        try:
            text = Path("/etc/resolv.conf").read_text()
        except OSError:
            return ()
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                found.append(str(address))
    return tuple(found)


def resolv_conf(controller_resolv: str) -> str:
    """The sandbox's /etc/resolv.conf: the controller's resolvers, reached through NAT.

    Loopback resolvers (a local stub) cannot be reached from a namespace: SandboxError.
    """
    servers, search = [], []
    for line in controller_resolv.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                if not ipaddress.ip_address(fields[1]).is_loopback:
                    servers.append(fields[1])
            except ValueError:
                continue
        elif fields and fields[0] in ("search", "domain"):
            search = fields[1:]
    if not servers:
        raise SandboxError(
            "the controller's /etc/resolv.conf names no resolver a sandbox can reach "
            "(only loopback ones): use --network host"
        )
    lines = [f"nameserver {s}\n" for s in servers[:3]]
    if search:
        lines.insert(0, f"search {' '.join(search)}\n")
    header = "# Written by mlflow-stack sandbox: the controller's resolvers, through NAT.\n"
    return header + "".join(lines)


def overlapping_routes(
    routes: list[dict[str, object]], net: ipaddress.IPv4Network, bridge: str = BRIDGE
) -> list[str]:
    """Routes of the controller (`ip -j route` objects) that overlap `net`, ours excepted."""
    found = []
    for route in routes:
        dst, dev = str(route.get("dst", "")), str(route.get("dev", ""))
        if dst in ("default", "") or dev == bridge:
            continue
        try:
            other = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if other.version == 4 and other.overlaps(net):
            found.append(f"{dst} dev {dev}")
    return found


# --- leases ------------------------------------------------------------------------------


def net_dir() -> Path:
    return Path(os.environ.get(NET_DIR_ENV) or DEFAULT_NET_DIR)


def _lease_path(address: ipaddress.IPv4Address) -> Path:
    return net_dir() / "leases" / str(address)


@contextlib.contextmanager
def lock() -> Iterator[None]:
    """Serialise leases and bridge/NAT changes machine-wide."""
    with locked(net_dir() / ".lock"):
        yield


@dataclass(frozen=True)
class Holder:
    """The instance holding an address."""

    name: str
    state: Path
    running: bool


def holder(address: ipaddress.IPv4Address) -> Holder | None:
    """Who holds `address` (running or kept stopped), or None if it is free."""
    from .machine import read_meta  # the instance's own record is the truth
    from .process import is_nspawn_of

    try:
        lease = json.loads(_lease_path(address).read_text())
        state = Path(lease["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    meta = read_meta(state)
    if meta.get("address") != str(address):
        return None  # the instance is gone or moved: a stale lease
    pid = meta.get("pid")
    running = isinstance(pid, int) and is_nspawn_of(pid, state)
    return Holder(str(meta.get("name", state.name)), state, running)


def available(state: Path, wanted: str | None, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The address `allocate` would lease now, or SandboxError (it leases nothing)."""
    if wanted:
        address = check_address(wanted, net)
        owner = holder(address)
        if owner and owner.state != state and owner.running:
            raise SandboxError(
                f"address {address} is in use by running sandbox {owner.name}: "
                "down it first or pick another address"
            )
        return address
    free = next((a for a in host_addresses(net) if holder(a) is None), None)
    if free is None:
        raise SandboxError(f"no free address left in {net}: down some sandboxes")
    return free


def allocate(
    state: Path, name: str, wanted: str | None, net: ipaddress.IPv4Network
) -> ipaddress.IPv4Address:
    """Lease an address to instance `state` (call with lock() held).

    `wanted` (asked for, or recorded by a kept instance) may be taken from a stopped instance,
    never from a running one; without it, the first address nobody holds.
    """
    address = available(state, wanted, net)
    if wanted:
        owner = holder(address)
        if owner and owner.state != state:
            log.warning(
                "sandbox %s takes address %s of stopped sandbox %s", name, address, owner.name
            )
    path = _lease_path(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"name": name, "state": str(state)}) + "\n")
    os.replace(tmp, path)
    return address


def release(state: Path, address: str | None) -> None:
    """Drop the lease of `address` if `state` holds it (call with lock() held)."""
    if not address:
        return
    path = _lease_path(ipaddress.IPv4Address(address))
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(path.read_text())["state"] == str(state):
            path.unlink()


def leases() -> list[ipaddress.IPv4Address]:
    """Addresses with a lease file (valid or not)."""
    folder = net_dir() / "leases"
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Address(entry.name))
    return sorted(found)


# --- the controller's side ---------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([which("ip") or "ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SandboxError(f"`ip {' '.join(args)}` failed: {first_line(proc.stderr)}")
    return proc


def _nft(script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [which("nft") or "nft", "-f", "-"], input=script, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise SandboxError(f"nft failed: {first_line(proc.stderr)}")
    return proc


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def table_exists() -> bool:
    proc = subprocess.run(
        [which("nft") or "nft", "list", "table", "ip", NFT_TABLE],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return proc.returncode == 0


def ensure(net: ipaddress.IPv4Network) -> None:
    """Bridge with the gateway address, NAT table, forwarding on (call with lock() held)."""
    gw = f"{gateway(net)}/{net.prefixlen}"
    if not bridge_exists():
        routes = json.loads(_ip("-j", "route", "show", "table", "all").stdout or "[]")
        clash = overlapping_routes(routes, net)
        if clash:
            raise SandboxError(
                f"the sandbox subnet {net} overlaps this machine's route {clash[0]}: "
                f"set ${SUBNET_ENV} to a free private /24"
            )
        _ip("link", "add", BRIDGE, "address", mac_of(gateway(net)), "type", "bridge")
        _ip("addr", "add", gw, "dev", BRIDGE)
    else:
        have = json.loads(_ip("-j", "-4", "addr", "show", "dev", BRIDGE).stdout or "[]")
        addrs = [f"{a['local']}/{a['prefixlen']}" for i in have for a in i.get("addr_info", [])]
        if gw not in addrs:
            raise SandboxError(
                f"bridge {BRIDGE} has {', '.join(addrs) or 'no address'}, not {gw}: another "
                f"${SUBNET_ENV} is in use on this machine (down its sandboxes, or use the same)"
            )
    _ip("link", "set", BRIDGE, "up")
    _nft(nft_ruleset(net, resolvers()))
    saved = net_dir() / "ip_forward.saved"
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(IP_FORWARD.read_text())
    IP_FORWARD.write_text("1\n")


def attach(address: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> Path:
    """Make the sandbox's namespace with eth0 configured; return its path for nspawn."""
    index = index_of(address, net)
    ns, veth = netns_name(index), veth_name(index)
    detach(address, net)  # leftovers of a crashed run on this address
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0",
            "address", mac_of(address), "netns", ns)  # fmt: skip
        _ip("link", "set", veth, "master", BRIDGE, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", str(gateway(net)))
    except BaseException:
        detach(address, net)
        raise
    _ip("neigh", "flush", "to", str(address), "dev", BRIDGE, check=False)
    return NETNS_DIR / ns


def detach(address: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> None:
    """Remove the sandbox's namespace (its veth pair goes with it)."""
    index = index_of(address, net)
    if (NETNS_DIR / netns_name(index)).exists():
        _ip("netns", "del", netns_name(index), check=False)
    if Path(f"/sys/class/net/{veth_name(index)}").exists():
        _ip("link", "del", veth_name(index), check=False)


def teardown_if_unused(net: ipaddress.IPv4Network) -> bool:
    """Remove bridge, table and forwarding when no sandbox runs (call with lock() held)."""
    if any((h := holder(a)) is not None and h.running for a in leases()):
        return False
    if table_exists():
        _nft(f"delete table ip {NFT_TABLE}\n", check=False)
    if bridge_exists():
        _ip("link", "del", BRIDGE, check=False)
    saved = net_dir() / "ip_forward.saved"
    if saved.exists():
        IP_FORWARD.write_text(saved.read_text().strip() + "\n")
        saved.unlink()
    return True
