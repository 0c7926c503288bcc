"""Facts: what a step needs to know about a host.

Each fact is a frozen dataclass with a shell `command()` and a pure `parse()` of that
command's output, so parsing is unit-tested with recorded outputs. `probing` gathers many
facts in one SSH command.

A fact is identified by its `key` (`kind:arg`), and every kind but the ad-hoc `Shell` can be
rebuilt from its key (`from_key`): the kinds register themselves by name when their class is
defined, and `check()` refuses an argument the code would never produce. That is how a saved
probe plan (a list of keys, see `probing`) turns back into commands: from this code, never from
text kept on disk.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mlflow_stack import inputs
from mlflow_stack.engine import probe_script

KINDS: dict[str, type[Fact]] = {}  # kind → class, for `from_key`
_UNIT = re.compile(r"^[A-Za-z0-9@._:-]{1,255}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
_LOOPBACK_URL = re.compile(r"^http://127\.0\.0\.1:\d{1,5}/[A-Za-z0-9/_.-]*$")


def checked_path(path: str) -> None:
    """A path argument a rebuilt fact accepts: absolute, shell-inert characters only."""
    inputs.safe_path(path, "fact path")


@dataclass(frozen=True)
class Fact:
    """Base class: subclasses define `command` and `parse` (and `kind`, which registers them)."""

    kind: ClassVar[str] = "fact"
    # A live fact reads state a running service holds (a database's users, a schema version):
    # it is read again before its step plans if the host changed since it was read.
    live: ClassVar[bool] = False
    # False: the command is not a function of the key (an ad-hoc `Shell`): never rebuilt.
    rebuildable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            if kind in KINDS and KINDS[kind].__qualname__ != cls.__qualname__:
                raise TypeError(f"fact kind {kind!r} is defined twice")
            KINDS[kind] = cls

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.arg()}"

    def arg(self) -> str:
        """The key's argument: nothing, the one field, or the fields as a JSON list."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self) if f.compare]
        if not values:
            return ""
        if len(values) == 1:
            return str(values[0])
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def from_arg(cls, arg: str) -> Fact:
        """The fact whose `arg()` is `arg` (the inverse of `arg` for plain dataclasses)."""
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if not names:
            if arg:
                raise ValueError(f"{cls.kind} takes no argument")
            return cls()
        if len(names) == 1:
            return cls(arg)
        values = json.loads(arg)
        if not isinstance(values, list) or len(values) != len(names):
            raise ValueError(f"{cls.kind} takes {len(names)} arguments")
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{cls.kind} takes text arguments")
        return cls(*values)

    def check(self) -> None:
        """Raise ValueError if the arguments are not ones the code produces (a rebuilt fact)."""

    def command(self) -> str:
        raise NotImplementedError

    def parse(self, output: str, rc: int) -> Any:
        raise NotImplementedError


def from_key(key: str) -> Fact | None:
    """The fact `key` names, rebuilt by this code; None for an unknown kind, an ad-hoc
    `Shell`, or an argument the code would not produce."""
    if not isinstance(key, str) or inputs.has_control(key) or len(key) > 4096:
        return None
    kind, _, arg = key.partition(":")
    cls = KINDS.get(kind)
    if cls is None or not cls.rebuildable:
        return None
    try:
        fact = cls.from_arg(arg)
        fact.check()
    except (ValueError, TypeError):
        return None
    return fact if fact.key == key else None


# --- value types -----------------------------------------------------------------------


@dataclass(frozen=True)
class OsInfo:
    id: str
    version_id: str
    codename: str
    id_like: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """`debian` or `ubuntu` (Ubuntu is checked first: it is also Debian-like)."""
        if self.id == "ubuntu" or "ubuntu" in self.id_like:
            return "ubuntu"
        if self.id == "debian" or "debian" in self.id_like:
            return "debian"
        return self.id


@dataclass(frozen=True)
class HostSize:
    """The memory and CPUs this host may use (a container's limits where it has them)."""

    memory_bytes: int
    cpus: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


@dataclass(frozen=True)
class PathInfo:
    kind: str  # "file", "directory", "link", "other"
    mode: int
    owner: str
    group: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


@dataclass(frozen=True)
class UnitInfo:
    load_state: str
    active_state: str
    sub_state: str
    unit_file_state: str
    need_daemon_reload: bool

    @property
    def exists(self) -> bool:
        return self.load_state == "loaded"

    @property
    def active(self) -> bool:
        return self.active_state in ("active", "reloading", "activating")

    @property
    def enabled(self) -> bool:
        return self.unit_file_state in ("enabled", "enabled-runtime", "static", "alias")


@dataclass(frozen=True)
class ShellResult:
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


# --- facts -----------------------------------------------------------------------------


def parse_os_release(text: str) -> OsInfo:
    """Parse /etc/os-release (KEY=value lines, values optionally quoted)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw)
        except ValueError:
            parts = [raw.strip("\"'")]
        values[key] = parts[0] if parts else ""
    return OsInfo(
        id=values.get("ID", "").lower(),
        version_id=values.get("VERSION_ID", ""),
        codename=values.get("VERSION_CODENAME", "") or values.get("UBUNTU_CODENAME", ""),
        id_like=tuple(values.get("ID_LIKE", "").lower().split()),
    )


@dataclass(frozen=True)
class OsRelease(Fact):
    kind: ClassVar[str] = "os"

    def command(self) -> str:
        return "cat /etc/os-release"

    def parse(self, output: str, rc: int) -> OsInfo:
        return parse_os_release(output)


def parse_host_size(text: str) -> HostSize:
    """Parse `memory_bytes=N cpus=N` (what `Size` prints)."""
    values = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        return HostSize(int(values["memory_bytes"]), max(1, int(values["cpus"])))
    except (KeyError, ValueError):
        raise ValueError(f"unexpected host size {text.strip()!r}") from None


@dataclass(frozen=True)
class Size(Fact):
    """Memory: MemTotal, or a smaller cgroup limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`, as a container sees its own); CPUs: `nproc` (CPU affinity)."""

    kind: ClassVar[str] = "size"

    def command(self) -> str:
        return (
            "mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 1024 )); "
            "for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do "
            'lim=$(cat "$f" 2>/dev/null) || continue; '
            'case $lim in ""|max) ;; *) [ "$lim" -lt "$mem" ] && mem=$lim ;; esac; done; '
            'echo "memory_bytes=$mem cpus=$(nproc)"'
        )

    def parse(self, output: str, rc: int) -> HostSize:
        return parse_host_size(output)


@dataclass(frozen=True)
class Packages(Fact):
    """Installed Debian packages among `names`: {name: version}."""

    names: tuple[str, ...]
    kind: ClassVar[str] = "packages"

    def arg(self) -> str:
        return ",".join(self.names)

    @classmethod
    def from_arg(cls, arg: str) -> Packages:
        return cls(tuple(arg.split(",")))

    def check(self) -> None:
        if not all(_PACKAGE.match(n) for n in self.names):
            raise ValueError("not a package name")

    def command(self) -> str:
        quoted = " ".join(shlex.quote(n) for n in self.names)
        return f"dpkg-query -W -f='${{Package}}\\t${{db:Status-Abbrev}}\\t${{Version}}\\n' {quoted}"

    def parse(self, output: str, rc: int) -> dict[str, str]:
        installed: dict[str, str] = {}
        for line in output.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].startswith("ii"):
                installed[parts[0].split(":")[0]] = parts[2]
        return installed


@dataclass(frozen=True)
class AptListsAge(Fact):
    """Seconds since the apt package lists were last updated (None: never)."""

    kind: ClassVar[str] = "apt-age"

    def command(self) -> str:
        return (
            "ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 && "
            "echo $(( $(date +%s) - $(stat -c %Y /var/lib/apt/lists/partial) ))"
        )

    def parse(self, output: str, rc: int) -> int | None:
        text = output.strip()
        return int(text) if rc == 0 and text.lstrip("-").isdigit() else None


def parse_path_info(output: str) -> PathInfo | None:
    """Parse `stat -c '%F|%a|%U|%G|%s'` plus an optional sha256 line."""
    lines = output.strip().splitlines()
    if not lines or "|" not in lines[0]:
        return None
    kind, mode, owner, group, size = lines[0].split("|")
    kinds = {"regular file": "file", "regular empty file": "file", "directory": "directory"}
    digest = lines[1].split()[0] if len(lines) > 1 and lines[1].strip() else None
    return PathInfo(
        kind=kinds.get(kind, "link" if "link" in kind else "other"),
        mode=int(mode, 8),
        owner=owner,
        group=group,
        size=int(size),
        sha256=digest,
    )


@dataclass(frozen=True)
class PathState(Fact):
    """Type, mode, owner, group, size and (for files) sha256 of a path; None if absent."""

    path: str
    kind: ClassVar[str] = "path"

    def arg(self) -> str:
        return self.path

    def check(self) -> None:
        checked_path(self.path)

    def command(self) -> str:
        return probe_script.path_command(self.path)

    def parse(self, output: str, rc: int) -> PathInfo | None:
        return parse_path_info(output)


@dataclass(frozen=True)
class User(Fact):
    name: str
    kind: ClassVar[str] = "user"

    def arg(self) -> str:
        return self.name

    def check(self) -> None:
        inputs.login_user(self.name, "fact user")

    def command(self) -> str:
        return f"getent passwd {shlex.quote(self.name)}"

    def parse(self, output: str, rc: int) -> UserInfo | None:
        line = output.strip()
        if rc != 0 or not line:
            return None
        name, _pw, uid, gid, _gecos, home, shell = line.split(":", 6)
        return UserInfo(name=name, uid=int(uid), gid=int(gid), home=home, shell=shell)


def parse_systemctl_show(output: str) -> UnitInfo:
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return UnitInfo(
        load_state=values.get("LoadState", "not-found"),
        active_state=values.get("ActiveState", "inactive"),
        sub_state=values.get("SubState", "dead"),
        unit_file_state=values.get("UnitFileState", ""),
        need_daemon_reload=values.get("NeedDaemonReload", "no") == "yes",
    )


@dataclass(frozen=True)
class Unit(Fact):
    """State of a systemd unit."""

    name: str
    kind: ClassVar[str] = "unit"

    def arg(self) -> str:
        return self.name

    def check(self) -> None:
        if not _UNIT.match(self.name):
            raise ValueError("not a unit name")

    def command(self) -> str:
        props = "LoadState,ActiveState,SubState,UnitFileState,NeedDaemonReload"
        return f"systemctl show --no-pager -p {props} {shlex.quote(self.name)}"

    def parse(self, output: str, rc: int) -> UnitInfo:
        return parse_systemctl_show(output)


@dataclass(frozen=True)
class LiveUnit(Unit):
    """A `Unit` fact re-read once the host has changed (a package install may add the unit)."""

    kind: ClassVar[str] = "live-unit"
    live: ClassVar[bool] = True


@dataclass(frozen=True)
class Http(Fact):
    """HTTP status of a GET on the host (0 when nothing answers)."""

    url: str
    kind: ClassVar[str] = "http"

    def arg(self) -> str:
        return self.url

    def check(self) -> None:
        if not _LOOPBACK_URL.match(self.url):
            raise ValueError("only the host's own services (http://127.0.0.1:PORT/…)")

    def command(self) -> str:
        return f"curl -s -o /dev/null -m 3 -w '%{{http_code}}' {shlex.quote(self.url)}"

    def parse(self, output: str, rc: int) -> int:
        text = output.strip()
        return int(text) if text.isdigit() else 0


@dataclass(frozen=True)
class Shell(Fact):
    """Exit code and stdout of a read-only shell snippet (a guard for a command step)."""

    name: str
    script: str = field(compare=False)
    kind: ClassVar[str] = "shell"
    rebuildable: ClassVar[bool] = False  # the script is not in the key

    def arg(self) -> str:
        return self.name

    def command(self) -> str:
        return self.script

    def parse(self, output: str, rc: int) -> ShellResult:
        return ShellResult(rc=rc, output=output)


@dataclass(frozen=True)
class LiveShell(Shell):
    """A `Shell` fact about a running service's state: re-read once the host has changed."""

    kind: ClassVar[str] = "live-shell"
    live: ClassVar[bool] = True


@dataclass(frozen=True)
class DirListing(Fact):
    """Names of the entries of a directory (empty when it does not exist)."""

    path: str
    kind: ClassVar[str] = "ls"

    def arg(self) -> str:
        return self.path

    def check(self) -> None:
        checked_path(self.path)

    def command(self) -> str:
        return f"ls -1A {shlex.quote(self.path)} 2>/dev/null || true"

    def parse(self, output: str, rc: int) -> tuple[str, ...]:
        return tuple(sorted(line for line in output.splitlines() if line))


@dataclass(frozen=True)
class FilesUnder(Fact):
    """The regular files under a directory, relative to it, one per line (sorted); exit code
    non-zero when it does not exist."""

    path: str
    kind: ClassVar[str] = "files-under"

    def check(self) -> None:
        checked_path(self.path)

    def command(self) -> str:
        r = shlex.quote(self.path)
        return f"[ -d {r} ] && cd {r} && find . -type f | sed 's|^\\./||' | sort"

    def parse(self, output: str, rc: int) -> ShellResult:
        return ShellResult(rc=rc, output=output)


@dataclass(frozen=True)
class FileContents(Fact):
    """Contents of the regular files directly in a directory: {name: text}."""

    path: str
    kind: ClassVar[str] = "contents"

    def arg(self) -> str:
        return self.path

    def check(self) -> None:
        checked_path(self.path)

    def command(self) -> str:
        p = shlex.quote(self.path)
        return (
            f'for f in {p}/*; do [ -f "$f" ] || continue; '
            "printf '%s\\n' \"$(basename \"$f\")\" | base64 -w0; printf ' '; "
            'base64 -w0 "$f"; echo; done'
        )

    def parse(self, output: str, rc: int) -> dict[str, str]:
        import base64

        files: dict[str, str] = {}
        for line in output.splitlines():
            if " " not in line:
                continue
            name_b64, _, data_b64 = line.partition(" ")
            name = base64.b64decode(name_b64).decode().rstrip("\n")
            files[name] = base64.b64decode(data_b64).decode(errors="replace")
        return files
