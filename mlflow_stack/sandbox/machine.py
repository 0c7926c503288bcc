"""Lifecycle of sandbox instances: up, down, reboot, load, status, list, OOM kills."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import cgroup, ssh
from . import distro as distros
from . import network as privnet
from .base import (
    ADDRESS,
    DEFAULT_HOST_PORT,
    PRIVATE_PORT,
    USER,
    SandboxError,
    SandboxInfo,
    check_name,
    check_network,
    check_port,
    default_network,
    instance_dir,
    is_valid_name,
    preflight,
    state_root,
    which,
)
from .instance import CONFIGURED, UPPER, configure, set_address
from .process import children, is_nspawn_of, kill_leftovers, stop_pid
from .render import parse_failed_units
from .rootfs import (
    ensure_base,
    ensure_tarball,
    locked,
    prune_bases,
    remove_tree,
    tarball_path,
)

log = logging.getLogger("mlflow_stack.sandbox")

BOOT_TIMEOUT = float(os.environ.get("MLFLOW_STACK_BOOT_TIMEOUT", "120"))
META = "instance.json"


@dataclass(frozen=True)
class Spec:
    """What an instance is: asked for by `up`, else recorded by an earlier boot."""

    network: str
    address: str | None  # None: allocate one (private network)
    port: int
    distro: str
    cpus: int | None
    memory: int | None  # bytes

    def record(self) -> dict[str, object]:
        return {"network": self.network, "address": self.address, "port": self.port,
                "distro": self.distro, "cpus": self.cpus, "memory": self.memory}  # fmt: skip


def resolve_spec(
    name: str,
    recorded: dict[str, object],
    *,
    port: int | None = None,
    network: str | None = None,
    address: str | None = None,
    distro: str | None = None,
    cpus: int | None = None,
    memory: str | int | None = None,
) -> Spec:
    """The instance's spec: each argument given, else what `recorded` (a kept instance's
    instance.json, {} for a new one) says, else the default. Pure."""
    old_net = recorded.get("network") or ("host" if recorded else None)  # older versions: host
    if network is None:
        network = str(old_net) if old_net else None
    if network is None and port not in (None, PRIVATE_PORT):
        # The call of earlier versions, `up(name, port)`: the shared network it meant.
        log.info("sandbox %s: SSH port %d given, so the shared host network", name, port)
        network = "host"
    network = check_network(network or default_network())
    if old_net and network != old_net:
        raise SandboxError(
            f"sandbox {name} was made with --network {old_net}: `down` it to change its network"
        )
    old_distro = str(recorded.get("distro") or ("bookworm" if recorded else ""))
    wanted = distros.get(distro or old_distro or None).suite
    if old_distro and wanted != old_distro:
        raise SandboxError(f"sandbox {name} is a {old_distro} host: `down` it to change that")
    if network == "host":
        if address not in (None, ADDRESS):
            raise SandboxError("--address is for --network private (host: always 127.0.0.1)")
        chosen = check_port(int(port or recorded.get("port") or DEFAULT_HOST_PORT))
        where: str | None = ADDRESS
    else:
        if port not in (None, PRIVATE_PORT):
            raise SandboxError(
                f"a private sandbox's sshd listens on port {PRIVATE_PORT} of its own address: "
                "--port is for --network host"
            )
        chosen = PRIVATE_PORT
        where = address or (str(recorded["address"]) if recorded.get("address") else None)
    old_cpus, old_memory = recorded.get("cpus"), recorded.get("memory")
    if cpus is None:
        cpus = old_cpus if isinstance(old_cpus, int) else None
    return Spec(
        network=network,
        address=where,
        port=chosen,
        distro=wanted,
        cpus=None if cpus is None else check_cpus(cpus),
        memory=cgroup.parse_size(memory) if memory is not None else (
            old_memory if isinstance(old_memory, int) else None),
    )  # fmt: skip


def check_cpus(cpus: int, available: int | None = None) -> int:
    """Return `cpus` if this machine has that many to give, else raise SandboxError."""
    have = available or len(os.sched_getaffinity(0))
    if not 1 <= int(cpus) <= have:
        raise SandboxError(f"invalid --cpus {cpus}: this machine can give 1 to {have}")
    return int(cpus)


def cpu_set(cpus: int, offset: int, available: list[int]) -> list[int]:
    """`cpus` of the `available` CPUs, starting at `offset` (sandboxes spread over the CPUs)."""
    start = offset % len(available)
    return sorted(available[(start + i) % len(available)] for i in range(cpus))


def up(
    name: str = "sandbox",
    port: int | None = None,
    *,
    fresh: bool = False,
    timeout: float | None = None,
    network: str | None = None,
    address: str | None = None,
    distro: str | None = None,
    cpus: int | None = None,
    memory: str | int | None = None,
) -> SandboxInfo:
    """Boot sandbox `name`; no-op if it already runs.

    network "private" (default): own namespace on the sandboxes' bridge, sshd on
    `address`:22 (`address` allocated unless given); "host": the controller's network, sshd
    on 127.0.0.1:`port` (default 2222; an older call `up(name, port)` means this).
    `distro`: bookworm (default), trixie or sid. `cpus`: CPUs it may run on (`nproc` says so);
    `memory`: a memory cgroup limit such as "1G". A stopped instance kept by `down(keep=True)`
    boots again as is, with its recorded network, address, distro and limits unless new
    `cpus`/`memory` are given; `fresh` rebuilds the cached root filesystem and starts from a
    pristine copy.
    """
    check_name(name)
    state = instance_dir(name)
    spec = resolve_spec(name, read_meta(state) if (state / CONFIGURED).exists() else {},
                        port=port, network=network, address=address, distro=distro,
                        cpus=cpus, memory=memory)  # fmt: skip
    preflight(
        need_debootstrap=fresh or not tarball_path(spec.distro).exists(),
        need_network=spec.network == "private",
    )
    with _lock(name), _forget_lock_unless(state):
        current = load(name)
        if current:
            log.info("sandbox %s already runs (ssh %s)", name, current.host_string)
            if fresh:
                log.warning("sandbox %s runs: --fresh ignored; `down` it first", name)
            return current
        meta = read_meta(state)
        if cgroup.pids(_groups(meta)):
            raise SandboxError(f"sandbox {name} lost its systemd-nspawn: `down` it, then `up`")
        base = None if fresh else _kept_base(state)
        spec = resolve_spec(name, meta if base else {}, port=port, network=network,
                            address=address, distro=distro, cpus=cpus, memory=memory)  # fmt: skip
        if spec.network == "host":
            check_port_free(spec.port)
        if spec.network == "private":  # fail before building anything
            with privnet.lock():
                privnet.available(state, spec.address, privnet.subnet())
        if not base:
            remove_tree(state)  # half-made, made by an older version, or asked to be fresh
            base = ensure_base(ensure_tarball(spec.distro, fresh=fresh))
            state.mkdir(mode=0o700, parents=True)
            write_meta(state, {"name": name, **spec.record(), "base": str(base), "pid": None})
            try:
                spec = _lease(state, name, spec)
            except BaseException:
                remove_tree(state)  # taken meanwhile: leave nothing half-made
                raise
        else:
            spec = _lease(state, name, spec)
        assert spec.address is not None
        resolv = _resolv_conf() if spec.network == "private" else None
        if (state / CONFIGURED).exists():
            set_address(state, base, name, spec.address, spec.port, resolv)
        else:
            configure(state, base, name, spec.address, spec.port, resolv)
        prune_bases(_bases_in_use() | {base}, spec.distro)
        if spec.network == "host":
            check_port_free(spec.port)
            others = [i.name for i in list_sandboxes() if i.name != name and i.port != 22]
            if others:
                log.warning(
                    "sandbox %s shares this machine's network with running sandbox(es) %s: "
                    "services on the same port (e.g. 3306, 5000, 8888) collide",
                    name, ", ".join(others),
                )  # fmt: skip
        return _boot(state, base, name, spec, BOOT_TIMEOUT if timeout is None else timeout)


def _lease(state: Path, name: str, spec: Spec) -> Spec:
    """Lease the private address (recorded at once, so the lease counts); host: as is."""
    if spec.network != "private":
        return spec
    with privnet.lock():
        address = str(privnet.allocate(state, name, spec.address, privnet.subnet()))
        spec = dataclasses.replace(spec, address=address)
        write_meta(state, {**read_meta(state), **spec.record()})
    return spec


def _resolv_conf() -> str:
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError as exc:
        raise SandboxError(f"cannot read /etc/resolv.conf: {exc.strerror}") from None
    return privnet.resolv_conf(text)


def down(name: str = "sandbox", *, keep: bool = False) -> bool:
    """Stop sandbox `name` and delete its state (`keep`: keep it for a later `up`).

    Returns False when there was no such sandbox.
    """
    check_name(name)
    preflight(need_debootstrap=False)
    state = instance_dir(name)
    with _lock(name):
        if not state.exists():
            _lock_path(name).unlink(missing_ok=True)
            return False
        meta = read_meta(state)
        pid = meta.get("pid")
        groups = _groups(meta)
        if isinstance(pid, int) and is_nspawn_of(pid, state):
            stop_pid(pid)
        kill_leftovers(name, groups)
        cgroup.remove(groups)
        _unplug(state, meta, release=not keep)
        if keep:
            write_meta(state, {**meta, "pid": None})
        else:
            remove_tree(state)
            _lock_path(name).unlink(missing_ok=True)
        return True


def reboot(name: str = "sandbox", *, timeout: float | None = None) -> SandboxInfo:
    """Restart a running sandbox as a host reboot: clean shutdown, then boot its own layer again.

    Everything written on the host survives; processes, /run and /tmp do not.
    """
    current = load(name)
    if current is None:
        raise SandboxError(f"sandbox {name} is not running: `up` it first")
    down(name, keep=True)
    return up(name, timeout=timeout)


def prune(prefix: str) -> list[str]:
    """Delete stopped instances whose name starts with `prefix`; return their names."""
    removed = []
    for state in sorted(state_root().glob(f"{prefix}*")):
        if state.is_dir() and is_valid_name(state.name):
            with _lock(state.name):
                if state.exists() and load(state.name) is None:
                    remove_tree(state)
                    _lock_path(state.name).unlink(missing_ok=True)
                    removed.append(state.name)
    return removed


def load(name: str) -> SandboxInfo | None:
    """The running sandbox `name`, or None (never created, stopped, or stale pid)."""
    state = instance_dir(name)
    try:
        meta = read_meta(state)
    except PermissionError:
        return None
    pid = meta.get("pid")
    if not isinstance(pid, int) or not is_nspawn_of(pid, state):
        return None
    return _info(state, meta, pid)


def oom_kills(name: str) -> int | None:
    """OOM kills in running sandbox `name`'s memory cgroup (None: no --memory, or not running)."""
    group = cgroup.memory_group(read_meta(instance_dir(name)).get("memory_cgroup"))
    return group.oom_kills() if group and load(name) else None


def status(name: str) -> dict[str, object]:
    """Facts about sandbox `name`: running, pid, address, port, distro, limits and OOM kills,
    uptime, systemd state, failed units."""
    state = instance_dir(name)
    meta = read_meta(state) if state.exists() else {}
    info = load(name)
    group = cgroup.memory_group(meta.get("memory_cgroup")) if info else None
    memory = meta.get("memory")
    result: dict[str, object] = {
        "name": name,
        "exists": state.exists(),
        "running": info is not None,
        "pid": info.pid if info else None,
        "network": meta.get("network") or ("host" if meta else None),
        "address": meta.get("address") or (ADDRESS if meta else None),
        "port": meta.get("port"),
        "user": USER,
        "distro": meta.get("distro") or ("bookworm" if meta else None),
        "cpus": meta.get("cpus"),
        "memory": cgroup.format_size(memory) if isinstance(memory, int) else None,
        "memory_used": group.usage() if group else None,
        "oom_kills": group.oom_kills() if group else None,
        "state_dir": str(state),
        "log": str(state / "nspawn.log"),
        "base": meta.get("base"),
        "uptime_s": None,
        "system_state": None,
        "failed_units": [],
    }
    if info:
        result["uptime_s"] = round(time.time() - float(meta.get("started", time.time())), 1)
        try:
            client = ssh.connect(info, timeout=10)
            try:
                system = ssh.exec_command(client, "systemctl is-system-running", 10).stdout
                result["system_state"] = system.strip()
                failed = ssh.exec_command(client, "systemctl --failed --plain --no-legend", 10)
                result["failed_units"] = parse_failed_units(failed.stdout)
            finally:
                client.close()
        except (OSError, _ssh_error(), TimeoutError) as exc:
            result["system_state"] = f"unreachable over SSH: {exc}"
    return result


def _ssh_error() -> type[Exception]:
    import paramiko

    return paramiko.SSHException


def list_sandboxes() -> list[SandboxInfo]:
    """Every running sandbox, by name."""
    root = state_root()
    dirs = root.iterdir() if root.is_dir() else []
    names = sorted(p.name for p in dirs if p.is_dir() and is_valid_name(p.name))
    return [info for info in map(load, names) if info is not None]


def check_port_free(port: int) -> None:
    """Raise SandboxError if 127.0.0.1:`port` cannot be bound (as sshd would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ADDRESS, port))
        except OSError as exc:
            raise SandboxError(
                f"port {port} on {ADDRESS} is in use ({exc.strerror}): pick another with --port"
            ) from None


def read_meta(state: Path) -> dict[str, object]:
    """The instance's recorded metadata ({} if none)."""
    try:
        return json.loads((state / META).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return {}


def write_meta(state: Path, meta: dict[str, object]) -> None:
    """Atomically record the instance's metadata."""
    tmp = state / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, state / META)


def _groups(meta: dict[str, object]) -> list[Path]:
    """The instance's cgroup directories recorded at boot."""
    recorded = meta.get("cgroups")
    return [Path(str(g)) for g in recorded] if isinstance(recorded, list) else []


def _kept_base(state: Path) -> Path | None:
    """The base of a complete instance kept by `down(keep=True)`, if it can boot again."""
    if not (state / CONFIGURED).exists():
        return None
    recorded = read_meta(state).get("base")
    base = Path(str(recorded)) if recorded else None
    if base is None or not base.is_dir():
        log.warning("sandbox %s: its base image is gone; starting from scratch", state.name)
        return None
    return base


def _lock_path(name: str) -> Path:
    return state_root() / ".locks" / f"{name}.lock"


@contextlib.contextmanager
def _forget_lock_unless(state: Path) -> Iterator[None]:
    """On failure, drop the lock file of an instance that was never created."""
    try:
        yield
    except BaseException:
        if not state.exists():
            _lock_path(state.name).unlink(missing_ok=True)
        raise


def _lock(name: str) -> contextlib.AbstractContextManager[None]:
    """Serialise up/down of one sandbox across processes."""
    return locked(_lock_path(name))


def _bases_in_use() -> set[Path]:
    """Bases referenced by existing instances (running or kept)."""
    root = state_root()
    dirs = [p for p in root.iterdir() if is_valid_name(p.name)] if root.is_dir() else []
    return {Path(str(b)) for b in (read_meta(d).get("base") for d in dirs) if b}


def _info(state: Path, meta: dict[str, object], pid: int) -> SandboxInfo:
    return SandboxInfo(
        name=state.name, address=str(meta.get("address") or ADDRESS), port=int(meta["port"]),
        user=USER, key_file=state / "id_ed25519", known_hosts=state / "known_hosts", pid=pid,
        state_dir=state,
    )  # fmt: skip


def nspawn_argv(
    base: Path,
    upper: Path,
    name: str,
    *,
    netns: Path | None = None,
    cpus: list[int] | None = None,
) -> list[str]:
    """Boot `name` from an overlay root: read-only `base` below, `upper` taking the changes.

    `netns`: join that network namespace (private network; /etc/resolv.conf is the instance's
    own); `cpus`: the CPUs it may run on.
    """
    layers = ":".join(str(p).replace(":", "\\:") for p in (base, upper))
    argv = [
        which("systemd-nspawn") or "systemd-nspawn", "-D", str(base), f"--overlay={layers}:/",
        "-b", "-M", name, "--register=no", "--keep-unit", "--console=passive",
    ]  # fmt: skip
    if netns is not None:
        argv += [f"--network-namespace-path={netns}", "--resolv-conf=off"]
    if cpus:
        argv.append(f"--cpu-affinity={','.join(map(str, cpus))}")
    return argv


def _boot(state: Path, base: Path, name: str, spec: Spec, timeout: float) -> SandboxInfo:
    distro = distros.get(spec.distro)
    net = privnet.subnet() if spec.network == "private" else None
    address = ipaddress.IPv4Address(spec.address) if net else None
    offset = privnet.index_of(address, net) if net and address else 0
    available = sorted(os.sched_getaffinity(0))
    cpus = cpu_set(spec.cpus, offset, available) if spec.cpus else None
    log.info("booting sandbox %s (%s, ssh on %s:%d)", name, distro.suite, spec.address, spec.port)
    groups = cgroup.create(name)
    meta: dict[str, object] = {"name": name, **spec.record(), "base": str(base), "pid": None}
    memory = None
    if spec.memory:
        memory = cgroup.create_memory(name, spec.memory)
        groups.append(memory.path)
        meta["memory_cgroup"] = {"path": str(memory.path), "version": memory.version}
    meta["cgroups"] = [str(g) for g in groups]
    env = {**os.environ, **distro.nspawn_env()}
    proc: subprocess.Popen[bytes] | None = None
    try:
        with privnet.lock() if net else contextlib.nullcontext():
            netns = None
            if net and address:
                privnet.ensure(net)
                netns = privnet.attach(address, net)
            argv = nspawn_argv(base, state / UPPER, name, netns=netns, cpus=cpus)
            with open(state / "nspawn.log", "ab") as out:
                proc = subprocess.Popen(
                    cgroup.wrap(groups, argv), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, env=env,
                )  # fmt: skip
            children[proc.pid] = proc
            meta["pid"] = proc.pid
            write_meta(state, {**meta, "started": time.time()})
            _wait_exec(proc)  # a concurrent `down` must see it run before the lock goes
        info = _info(state, meta, proc.pid)
        _wait_ready(info, proc, time.monotonic() + timeout)
    except BaseException:
        if proc is not None:
            stop_pid(proc.pid)
        kill_leftovers(name, groups)
        cgroup.remove(groups)
        meta["pid"] = None
        write_meta(state, meta)
        _unplug(state, meta, release=False)
        raise
    return info


def _wait_exec(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait until the cgroup wrapper has become systemd-nspawn (or died)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return
        if os.path.basename(argv0) == b"systemd-nspawn":
            return
        time.sleep(0.005)


def _unplug(state: Path, meta: dict[str, object], *, release: bool) -> None:
    """After the container stopped: remove its network namespace (unless another instance
    holds the address now), drop the lease if `release`, and the bridge and NAT with the
    last running sandbox."""
    if meta.get("network") != "private" or not meta.get("address"):
        return
    net = privnet.subnet()
    address = ipaddress.IPv4Address(str(meta["address"]))
    with privnet.lock():
        owner = privnet.holder(address)
        if owner is None or owner.state == state:
            privnet.detach(address, net)
        if release:
            privnet.release(state, str(address))
        privnet.teardown_if_unused(net)


def _wait_ready(info: SandboxInfo, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait for sshd, a key login, then `systemctl is-system-running --wait`."""
    where = f"see {info.log_file}"

    def check(what: str) -> None:
        if proc.poll() is not None:
            raise SandboxError(
                f"systemd-nspawn exited (code {proc.returncode}) while booting {info.name}; {where}"
            )
        if time.monotonic() > deadline:
            raise SandboxError(f"sandbox {info.name} timed out waiting for {what}; {where}")

    while ssh.banner(info.address, info.port) is None:
        check("sshd")
        time.sleep(0.1)
    import paramiko

    while True:
        try:
            client = ssh.connect(info, timeout=5)
            break
        except paramiko.BadHostKeyException:
            fix = "pick another --port" if info.port != PRIVATE_PORT else "pick another address"
            raise SandboxError(
                f"{info.address}:{info.port} answers with a foreign host key: {fix}"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            check(f"an SSH login as {info.user} (last error: {exc})")
            time.sleep(0.25)
    try:
        left = max(1.0, deadline - time.monotonic())
        state = ssh.exec_command(client, "systemctl is-system-running --wait", left).stdout.strip()
        if state == "degraded":
            out = ssh.exec_command(client, "systemctl --failed --plain --no-legend").stdout
            units = ", ".join(parse_failed_units(out)) or "unknown"
            log.warning("sandbox %s is degraded; failed units: %s", info.name, units)
        elif state != "running":
            raise SandboxError(f"sandbox {info.name} booted into state {state!r}; {where}")
    except TimeoutError:
        raise SandboxError(f"sandbox {info.name} timed out waiting for systemd; {where}") from None
    finally:
        client.close()
