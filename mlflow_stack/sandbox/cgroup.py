"""A private cgroup per sandbox.

With `--keep-unit` systemd-nspawn puts the container below its own cgroup; two sandboxes
started from the same cgroup would share one `payload` tree (their units would see each other's
processes). Each nspawn is therefore started inside its own sub-cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

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
