"""A private cgroup per sandbox, and its memory limit.

With `--keep-unit` systemd-nspawn puts the container below its own cgroup; two sandboxes
started from the same cgroup would share one `payload` tree (their units would see each other's
processes). Each nspawn is therefore started inside its own sub-cgroup.

A memory limit (`up(memory=...)`) is one more group, `mlflow-stack-<name>` below this process's
memory cgroup: in the v1 `memory` hierarchy (`memory.limit_in_bytes`, and the memory+swap limit
where the kernel has it), or in the unified hierarchy when the memory controller is there
(`memory.max`, `memory.swap.max` 0). Every process of the container inherits it; the container
cannot move out of it (v1 hierarchies are read-only inside, and a unified-hierarchy guest such
as sid only sees its own subtree). Its OOM kills are counted in `memory.oom_control`'s
`oom_kill` (v1) or `memory.events`' `oom_kill` (v2).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from .base import SandboxError

PREFIX = "mlflow-stack-"
# Move the shell into every cgroup given before `--`, then become the real command.
WRAPPER = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def hierarchies(mountinfo: str, proc_cgroup: str) -> list[Path]:
    """Cgroup directories of this process in the hierarchies nspawn uses.

    Those are the unified (v2) hierarchy and the named v1 `name=systemd` one, if mounted.
    """
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        ident, controllers, path = line.split(":", 2)
        if ident == "0" and controllers == "":
            own["cgroup2"] = path
        elif "name=systemd" in controllers.split(","):
            own["name=systemd"] = path
    found = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        point = pre.split()[4]
        fstype, _, options = post.split()[:3]
        key = "cgroup2" if fstype == "cgroup2" else None
        if fstype == "cgroup" and "name=systemd" in options.split(","):
            key = "name=systemd"
        if key and key in own:
            found.append(Path(point) / own[key].lstrip("/"))
    return found


def create(name: str) -> list[Path]:
    """Create the sandbox's cgroups (one per hierarchy); [] when cgroups are not writable."""
    mountinfo = Path("/proc/self/mountinfo").read_text()
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    made = []
    for base in hierarchies(mountinfo, proc_cgroup):
        group = base / f"{PREFIX}{name}"
        try:
            group.mkdir(exist_ok=True)
        except OSError:
            continue
        made.append(group)
    return made


def wrap(groups: list[Path], argv: list[str]) -> list[str]:
    """`argv` prefixed so that the process joins `groups` before it starts."""
    if not groups:
        return argv
    return ["/bin/sh", "-c", WRAPPER, "sh", *(str(g / "cgroup.procs") for g in groups), "--", *argv]


def pids(groups: list[Path]) -> list[int]:
    """Every process left in the groups and their sub-groups."""
    found = []
    for group in groups:
        for dirpath, _dirs, files in os.walk(group):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    text = Path(dirpath, "cgroup.procs").read_text()
                    found += [int(pid) for pid in text.split()]
    return sorted(set(found))


def kill(groups: list[Path]) -> None:
    """SIGKILL every process of the groups (e.g. a container orphaned by a killed nspawn)."""
    for group in groups:
        knob = group / "cgroup.kill"  # cgroup v2: atomic, race-free
        if knob.exists():
            with contextlib.suppress(OSError):
                knob.write_text("1")
    for pid in pids(groups):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove(groups: list[Path]) -> None:
    """Remove the (empty) cgroup trees, deepest first; busy ones are left alone."""
    for group in groups:
        if not group.is_dir() or not group.name.startswith(PREFIX):
            continue
        for dirpath, _dirs, _files in os.walk(group, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


# --- memory limit --------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
MIN_MEMORY = 64 * 2**20  # below this systemd and sshd cannot even start


def parse_size(text: str | int) -> int:
    """Bytes in `text`: `1G`, `1GiB`, `512M`, `256m`, `1.5G`, plain bytes (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise SandboxError(f"invalid memory size {text!r}: write e.g. 1G, 512M or 1.5GiB")
        number, unit = match.groups()
        value = int(float(number) * 1024 ** "bkmgt".index(unit.lower() or "b"))
    if value < MIN_MEMORY:
        raise SandboxError(f"memory size {text!r} is too small: give at least 64M")
    return value


def format_size(value: int) -> str:
    """`1073741824` -> `1G` (the largest exact binary unit)."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if value % 1024**power == 0:
            return f"{value // 1024**power}{unit}"
    return str(value)


@dataclass(frozen=True)
class MemoryGroup:
    """Where a sandbox's memory limit lives."""

    path: Path
    version: int  # 1: the v1 `memory` hierarchy, 2: the unified one

    def limit_files(self, limit: int) -> list[tuple[str, str]]:
        """(file, value) to write, in order (v1: memory before memory+swap)."""
        if self.version == 1:
            return [("memory.limit_in_bytes", str(limit)),
                    ("memory.memsw.limit_in_bytes", str(limit))]  # fmt: skip
        return [("memory.max", str(limit)), ("memory.swap.max", "0")]

    def read(self, file: str) -> str | None:
        try:
            return (self.path / file).read_text()
        except OSError:
            return None

    def oom_kills(self) -> int | None:
        """Processes the kernel's OOM killer killed in this group (None: not readable)."""
        text = self.read("memory.oom_control" if self.version == 1 else "memory.events")
        return None if text is None else parse_oom_kills(text)

    def limit(self) -> int | None:
        text = self.read("memory.limit_in_bytes" if self.version == 1 else "memory.max")
        return None if text is None or text.strip() == "max" else int(text)

    def usage(self) -> int | None:
        text = self.read("memory.usage_in_bytes" if self.version == 1 else "memory.current")
        return None if text is None else int(text)


def parse_oom_kills(text: str) -> int | None:
    """The `oom_kill N` counter of memory.oom_control (v1) or memory.events (v2)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "oom_kill":
            return int(fields[1])
    return None


def memory_parent(mountinfo: str, proc_cgroup: str) -> MemoryGroup | None:
    """This process's memory cgroup: v1 `memory` hierarchy if mounted, else the unified one
    when it has the memory controller; None when there is neither."""
    own_v1 = own_v2 = None
    for line in proc_cgroup.splitlines():
        ident, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            own_v1 = path
        elif ident == "0" and controllers == "":
            own_v2 = path
    v2_mount = None
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        point = pre.split()[4]
        fstype, _, options = post.split()[:3]
        if fstype == "cgroup" and "memory" in options.split(",") and own_v1 is not None:
            return MemoryGroup(Path(point) / own_v1.lstrip("/"), 1)
        if fstype == "cgroup2" and own_v2 is not None:
            v2_mount = Path(point) / own_v2.lstrip("/")
    if v2_mount is not None:
        return MemoryGroup(v2_mount, 2)
    return None


def create_memory(name: str, limit: int) -> MemoryGroup:
    """The sandbox's memory group with `limit` bytes set; SandboxError when impossible."""
    parent = memory_parent(Path("/proc/self/mountinfo").read_text(),
                           Path("/proc/self/cgroup").read_text())  # fmt: skip
    if parent is None:
        raise SandboxError("no memory cgroup controller on this machine: run without --memory")
    if parent.version == 2:
        controllers = parent.read("cgroup.controllers") or ""
        if "memory" not in controllers.split():
            raise SandboxError(
                f"the memory controller is not delegated to {parent.path}: run without --memory"
            )
        try:  # a child of ours gets the controller only if our group hands it down
            (parent.path / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            raise SandboxError(
                f"cannot enable the memory controller below {parent.path} ({exc.strerror}): "
                "start the tool from a cgroup of its own (e.g. systemd-run --scope)"
            ) from None
    group = MemoryGroup(parent.path / f"{PREFIX}{name}", parent.version)
    try:
        group.path.mkdir(exist_ok=True)
        for file, value in group.limit_files(limit):
            knob = group.path / file
            if knob.exists() or file in ("memory.limit_in_bytes", "memory.max"):
                knob.write_text(value)
    except OSError as exc:
        raise SandboxError(f"cannot limit memory in {group.path}: {exc.strerror}") from None
    return group


def memory_group(recorded: object) -> MemoryGroup | None:
    """The MemoryGroup recorded in instance.json as {"path": ..., "version": ...}, if any."""
    if not isinstance(recorded, dict) or not recorded.get("path"):
        return None
    return MemoryGroup(Path(str(recorded["path"])), int(recorded.get("version", 1)))
