"""Lifecycle of sandbox instances: up, down, load, status, list."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from . import cgroup, ssh
from .base import (
    ADDRESS,
    USER,
    SandboxError,
    SandboxInfo,
    check_name,
    check_port,
    instance_dir,
    is_valid_name,
    preflight,
    state_root,
    which,
)
from .instance import CONFIGURED, UPPER, configure, set_port
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


def up(
    name: str = "sandbox", port: int = 2222, *, fresh: bool = False, timeout: float | None = None
) -> SandboxInfo:
    """Boot sandbox `name` with sshd on 127.0.0.1:`port`; no-op if it already runs.

    A stopped instance kept by `down(keep=True)` is booted again as is; `fresh` rebuilds the
    cached root filesystem and starts from a pristine copy.
    """
    check_name(name)
    check_port(port)
    preflight(need_debootstrap=fresh or not tarball_path().exists())
    state = instance_dir(name)
    with _lock(name), _forget_lock_unless(state):
        current = load(name)
        if current:
            log.info("sandbox %s already runs (ssh port %d)", name, current.port)
            if fresh:
                log.warning("sandbox %s runs: --fresh ignored; `down` it first", name)
            return current
        if cgroup.pids(_groups(read_meta(state))):
            raise SandboxError(f"sandbox {name} lost its systemd-nspawn: `down` it, then `up`")
        check_port_free(port)
        base = None if fresh else _kept_base(state)
        if base:
            set_port(state, base, name, port)
        else:
            remove_tree(state)  # half-made, made by an older version, or asked to be fresh
            base = ensure_base(ensure_tarball(fresh=fresh))
            state.mkdir(mode=0o700, parents=True)
            write_meta(state, {"name": name, "port": port, "base": str(base), "pid": None})
            configure(state, base, name, port)
        prune_bases(_bases_in_use() | {base})
        check_port_free(port)
        others = [i.name for i in list_sandboxes() if i.name != name]
        if others:
            log.warning(
                "sandbox %s shares this machine's network with running sandbox(es) %s: "
                "services on the same port (e.g. 3306, 5000, 8888) collide",
                name, ", ".join(others),
            )  # fmt: skip
        return _boot(state, base, name, port, BOOT_TIMEOUT if timeout is None else timeout)


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
    return up(name, current.port, timeout=timeout)


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
    return _info(state, name, int(meta["port"]), pid)


def status(name: str) -> dict[str, object]:
    """Facts about sandbox `name`: running, pid, port, uptime, systemd state, failed units."""
    state = instance_dir(name)
    meta = read_meta(state) if state.exists() else {}
    info = load(name)
    result: dict[str, object] = {
        "name": name,
        "exists": state.exists(),
        "running": info is not None,
        "pid": info.pid if info else None,
        "address": ADDRESS,
        "port": meta.get("port"),
        "user": USER,
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


def _info(state: Path, name: str, port: int, pid: int) -> SandboxInfo:
    return SandboxInfo(
        name=name, address=ADDRESS, port=port, user=USER, key_file=state / "id_ed25519",
        known_hosts=state / "known_hosts", pid=pid, state_dir=state,
    )  # fmt: skip


def nspawn_argv(base: Path, upper: Path, name: str) -> list[str]:
    """Boot `name` from an overlay root: read-only `base` below, `upper` taking the changes."""
    layers = ":".join(str(p).replace(":", "\\:") for p in (base, upper))
    return [
        which("systemd-nspawn") or "systemd-nspawn", "-D", str(base), f"--overlay={layers}:/",
        "-b", "-M", name, "--register=no", "--keep-unit", "--console=passive",
    ]  # fmt: skip


def _boot(state: Path, base: Path, name: str, port: int, timeout: float) -> SandboxInfo:
    argv = nspawn_argv(base, state / UPPER, name)
    log.info("booting sandbox %s (ssh on %s:%d)", name, ADDRESS, port)
    groups = cgroup.create(name)
    with open(state / "nspawn.log", "ab") as out:
        proc = subprocess.Popen(
            cgroup.wrap(groups, argv), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    children[proc.pid] = proc
    meta = {"name": name, "port": port, "base": str(base), "pid": proc.pid,
            "cgroups": [str(g) for g in groups]}  # fmt: skip
    write_meta(state, {**meta, "started": time.time()})
    info = _info(state, name, port, proc.pid)
    try:
        _wait_ready(info, proc, time.monotonic() + timeout)
    except BaseException:
        stop_pid(proc.pid)
        kill_leftovers(name, groups)
        cgroup.remove(groups)
        write_meta(state, {**meta, "pid": None})
        raise
    return info


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
            raise SandboxError(
                f"port {info.port} answers with a foreign host key: pick another --port"
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
