"""`invoke backup`: one consistent snapshot of a host, streamed to a directory here.

The host runs `stackdata.py backup` (installed by the mlflow_server role), which holds the
data lock (no migration or gc meanwhile), dumps both databases in one transaction (or takes
SQLite's online backup), then the auth database, the artifact store and the Jupyter
workspace, each through zstd, as one framed stream on stdout: nothing is staged on the host.
Here each part is written to its own file as it arrives and hashed; the host's sha256 of what
it sent must match. Everything goes into `.<name>.partial/`, which is renamed to `<name>/`
only once the stream ended complete, every part matched and the manifest was written: a
killed backup leaves a `.partial` directory that `invoke restore` refuses.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_stack import hostside, layout
from mlflow_stack.actions.progress import Progress, human
from mlflow_stack.actions.remote import ActionError
from mlflow_stack.engine.host import Host
from mlflow_stack.layout import Layout

MANIFEST = "manifest.json"
FORMAT = 1
STALE_AGENT = 97  # exit code: stackdata.py on the host is missing or another version's
ROOT = Path(__file__).resolve().parents[2]


def agent_digest() -> str:
    return hashlib.sha256(hostside.read("stackdata.py").encode()).hexdigest()


def agent_command(place: Layout, *args: str) -> str:
    """Shell running `stackdata.py ARGS` on the host as root, if it is this version's."""
    agent = layout.STACKDATA
    check = (
        f'[ "$(sha256sum < {agent} 2>/dev/null | cut -d" " -f1)" = {agent_digest()} ] || '
        f"{{ echo {shlex.quote(agent)} is missing or from another version >&2; "
        f"exit {STALE_AGENT}; }}"
    )
    argv = " ".join(shlex.quote(a) for a in args)
    return f"{check}; cd / && {place.python(layout.MLFLOW_ENV)} -I {agent} {argv}"


def agent_failure(host: Host, rc: int, stderr: str, what: str) -> ActionError:
    """One line for a failed `stackdata.py` command."""
    if rc == STALE_AGENT:
        return ActionError(
            f"{host.name}: the host's backup tools are missing or from another version; "
            f"run: invoke provision --host {host.name}"
        )
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return ActionError(f"{host.name}: {what}: {lines[-1] if lines else f'exit {rc}'}")


def tool_info() -> dict:
    """This tool's name, version and commit (when run from a git checkout)."""
    version = "?"
    with contextlib.suppress(OSError):
        found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
        version = found[1] if found else "?"
    info = {"name": "mlflow-stack", "version": version}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if commit:
            info["commit"] = commit
    return info


class StreamError(ActionError):
    """The backup stream broke its own rules (a part that arrived different, a bad frame)."""


@dataclass
class Incoming:
    """A part being received: its file, hash and byte count."""

    name: str
    file: object
    digest: object = field(default_factory=hashlib.sha256)
    bytes: int = 0
    raw: int = 0


@dataclass
class Receiver:
    """Parses the host's frames as they arrive: each part (several at a time) into its own
    file, hashed; a finished part is flushed to disk in the background."""

    directory: Path
    progress: Progress | None = None
    header: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    parts: dict[str, dict] = field(default_factory=dict)  # file name -> what arrived
    complete: bool = False
    received: int = 0  # bytes of parts written here
    raw_done: int = 0  # source bytes of the finished parts
    _open: dict[int, Incoming] = field(default_factory=dict)
    _head: bytearray = field(default_factory=bytearray)
    _kind: bytes = b""
    _remaining: int = -1  # bytes of the current frame's payload still to come; -1: a header
    _target: Incoming | None = None  # the part a data frame's bytes go to (after its id byte)
    _small: bytearray = field(default_factory=bytearray)
    _syncing: list = field(default_factory=list)
    _sync_errors: list = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            if self._remaining < 0:
                take = min(5 - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) == 5:
                    self._kind = bytes(self._head[:1])
                    self._remaining = struct.unpack(">I", self._head[1:])[0]
                    self._head.clear()
                    self._target = None
                    if self._remaining == 0:
                        self._frame(b"")
            elif self._kind == b"D" and self._target is None:
                ident = view[pos]
                pos += 1
                self._remaining -= 1
                self._target = self._open.get(ident)
                if self._target is None:
                    raise StreamError(f"the backup stream has data of an unknown part {ident}")
                if self._remaining == 0:
                    self._remaining = -1
            else:
                take = min(self._remaining, end - pos)
                piece = view[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._kind == b"D":
                    self._data(self._target, piece)
                else:
                    self._small += piece
                if self._remaining == 0:
                    if self._kind == b"D":
                        self._remaining = -1
                    else:
                        payload, self._small = bytes(self._small), bytearray()
                        self._frame(payload)

    def _frame(self, payload: bytes) -> None:
        kind = self._kind
        self._remaining = -1
        if self.complete:
            raise StreamError("the backup stream went on after its end")
        if kind == b"Z":
            if self._open:
                raise StreamError("the backup stream ended with parts still open")
            self.complete = True
            return
        value = json.loads(payload) if payload else {}
        if kind == b"H":
            self.header = value
            if self.progress is not None:
                self.progress.total = sum(value.get("estimate", {}).values())
        elif kind == b"B":
            self._begin(int(value["id"]), value["name"])
        elif kind == b"E":
            self._end(value)
        elif kind == b"P":
            incoming = self._open.get(int(value["id"]))
            if incoming is not None:
                incoming.raw = int(value["raw"])
            self._show()
        elif kind == b"M":
            self.manifest = value
        else:
            raise StreamError(f"the backup stream has an unknown frame {kind!r}")

    def _show(self, phase: str = "") -> None:
        if self.progress is not None:
            done = self.raw_done + sum(p.raw for p in self._open.values())
            self.progress.update(done=done, moved=self.received, phase=phase)

    def _begin(self, ident: int, name: str) -> None:
        taken = {p.name for p in self._open.values()} | set(self.parts)
        if ident in self._open or name in taken or "/" in name or name.startswith("."):
            raise StreamError(f"the backup stream has a bad part {name!r}")
        if name == MANIFEST:
            raise StreamError(f"the backup stream has a bad part name {name!r}")
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._open[ident] = Incoming(name, os.fdopen(fd, "wb", buffering=0))
        self._show(phase=", ".join(p.name for p in self._open.values()))

    def _data(self, incoming: Incoming, piece: memoryview) -> None:
        incoming.file.write(piece)
        incoming.digest.update(piece)
        incoming.bytes += len(piece)
        self.received += len(piece)

    def _end(self, info: dict) -> None:
        incoming = self._open.pop(int(info.get("id", -1)), None)
        if incoming is None or info.get("name") != incoming.name:
            raise StreamError("the backup stream ends a part it did not begin")
        digest = incoming.digest.hexdigest()
        if digest != info["sha256"] or incoming.bytes != info["bytes"]:
            incoming.file.close()
            raise StreamError(
                f"part {incoming.name} arrived different from what the host sent "
                f"({incoming.bytes} of {info['bytes']} bytes, sha256 mismatch)"
            )
        # to disk in the background while the other parts go on arriving
        syncing = threading.Thread(target=self._sync_and_close, args=(incoming,), daemon=True)
        syncing.start()
        self._syncing.append(syncing)
        self.parts[incoming.name] = {**info, "sha256": digest}
        self.raw_done += int(info.get("raw_bytes", 0))
        phase = ", ".join(p.name for p in self._open.values()) or "finishing"
        self._show(phase=phase)

    def _sync_and_close(self, incoming: Incoming) -> None:
        try:
            os.fsync(incoming.file.fileno())
        except OSError as exc:
            self._sync_errors.append(f"{incoming.name}: {exc.strerror}")
        finally:
            incoming.file.close()

    def close(self) -> None:
        """Every received part on disk (fsync'd) and closed; `OSError` if one could not be."""
        for incoming in self._open.values():
            incoming.file.close()
        self._open.clear()
        for syncing in self._syncing:
            syncing.join()
        self._syncing.clear()
        if self._sync_errors:
            raise OSError(f"could not write the backup to disk: {self._sync_errors[0]}")


@dataclass
class BackupResult:
    path: Path
    manifest: dict
    seconds: float

    @property
    def sent(self) -> int:
        return sum(p["bytes"] for p in self.manifest["parts"].values())

    @property
    def raw(self) -> int:
        return sum(p.get("raw_bytes", 0) for p in self.manifest["parts"].values())


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(
    host: Host,
    place: Layout,
    to: Path,
    *,
    with_secrets: bool = False,
    level: int = 1,
    progress: Progress | None = None,
    name: str | None = None,
) -> BackupResult:
    """Stream a backup of `host` into a new directory under `to`; its path once complete."""
    started = time.monotonic()
    to.mkdir(parents=True, exist_ok=True)
    final = to / (name or f"{host.name}-{utc_stamp()}")
    if final.exists():
        raise ActionError(f"{final} already exists; choose another --to")
    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(mode=0o700)
    receiver = Receiver(partial, progress)
    args = ["backup", "--level", str(level)] + (["--with-secrets"] if with_secrets else [])
    ok = False
    try:
        result = host.stream(agent_command(place, *args), sink=receiver.feed, timeout=900)
        try:
            receiver.close()
        except OSError as exc:
            raise ActionError(f"{host.name}: {exc}") from None
        if result.rc != 0:
            raise agent_failure(host, result.rc, result.stderr, "backup failed")
        if not receiver.complete or not receiver.manifest:
            raise ActionError(f"{host.name}: the backup stream ended early; nothing was kept")
        manifest = {
            "format": FORMAT,
            "tool": tool_info(),
            "host": host.name,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **receiver.manifest,
            "seconds": round(time.monotonic() - started, 2),
        }
        arrived = {p["name"] for p in receiver.parts.values()}
        listed = {p["name"] for p in manifest["parts"].values()}
        if arrived != listed:
            raise StreamError(f"{host.name}: the manifest lists other parts than arrived")
        manifest_path = partial / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        manifest_path.chmod(0o600)
        fsync_dir(partial)
        os.rename(partial, final)
        fsync_dir(final.parent)
        ok = True
    finally:
        with contextlib.suppress(OSError):
            receiver.close()
        if progress is not None:
            progress.finish()
        if not ok:  # a failure we saw: nothing half-made stays (a SIGKILL leaves .partial)
            for child in partial.glob("*"):
                child.unlink()
            with contextlib.suppress(OSError):
                partial.rmdir()
    return BackupResult(final, manifest, time.monotonic() - started)


def summary(result: BackupResult) -> list[str]:
    """What `invoke backup` prints."""
    m = result.manifest
    counts = m["counts"]["after"]
    shown = ", ".join(
        f"{counts[k]} {label}"
        for k, label in (
            ("experiments", "experiments"),
            ("runs", "runs"),
            ("registered_models", "registered models"),
            ("optuna_trials", "trials"),
            ("auth_users", "users"),
        )
        if k in counts
    )
    rate = result.raw / max(result.seconds, 1e-6)
    lines = [
        f"backup of {m['host']}: {result.path}",
        f"  MLflow {m['mlflow_version']} (schema {m['schema']}, {m['backend']}); {shown}",
    ]
    for part in sorted(m["parts"].values(), key=lambda p: p["name"]):
        files = f", {part['files']} files" if "files" in part else ""
        lines.append(
            f"  {part['name']:<24} {human(part['bytes']):>10}  (from {human(part['raw_bytes'])}"
            f"{files})  sha256 {part['sha256'][:16]}…"
        )
    lines.append(
        f"  {human(result.raw)} in {result.seconds:.1f} s ({human(rate)}/s), "
        f"{human(result.sent)} transferred"
    )
    warned = [w for p in m["parts"].values() for w in p.get("warnings", ())]
    lines += [f"  warning: {w}" for w in warned[:5]]
    if m.get("with_secrets"):
        lines.append(
            "  it holds the host's secrets (--with-secrets): its directory is 0700, its files "
            "0600; keep it as safe as the host"
        )
    return lines


# --- backup.before_upgrade: controller --------------------------------------------------


def pending_upgrade(host: Host, host_vars) -> bool:
    """Whether a converge would change the host's serving mlflow env (its recorded
    requirements differ from the wanted ones), which migrates the schema."""
    from mlflow_stack.env_requirements import digest, requirements_of
    from mlflow_stack.role_facts import STAMP

    wanted = digest(requirements_of(host_vars, layout.MLFLOW_ENV))
    path = layout.env_dir(host_vars.python.prefix, layout.MLFLOW_ENV)
    found = host.run(f"[ -f {path}/pyvenv.cfg ] && cat {path}/{STAMP}")
    return found.ok and found.stdout.strip() != wanted


def before_upgrades(hosts: list, check: bool = False) -> list[str]:
    """With `backup.before_upgrade: controller`, a whole backup of each host whose MLflow a
    converge would change, into `backup.dir`, before anything changes (the converge still
    takes its own dump on the host, to put back if the migration fails)."""
    lines = []
    for resolved in hosts:
        bv = resolved.vars.backup
        if bv.before_upgrade != "controller" or "mlflow_server" not in resolved.roles:
            continue
        host = Host(resolved.target)
        try:
            if not pending_upgrade(host, resolved.vars):
                continue
            if check:
                lines.append(
                    f"{resolved.name}: MLflow would be upgraded; a backup would go to {bv.dir}"
                )
                continue
            result = backup(
                host,
                Layout.of(resolved.vars),
                Path(bv.dir),
                progress=Progress(f"backup of {resolved.name} before its MLflow upgrade"),
            )
            lines.append(f"{resolved.name}: MLflow upgrade ahead; backed up first to {result.path}")
        finally:
            host.close()
    return lines
