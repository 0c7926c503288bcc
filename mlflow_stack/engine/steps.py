"""Steps: a wanted state, the facts needed to compare it, and the commands for the difference.

`plan()` is pure: from gathered facts it returns None (already as wanted) or a `Change`
listing the commands to run. The runner applies changes, handles notifications and
reports; steps never touch SSH themselves.

A step has an `id` (what other steps and the runner refer to: `changed`, `waits_for`) and a
`label` (what people read); and it declares how it is scheduled (`Schedule`), which units it
manages (their handlers run with its role) and which it notifies. A new kind of step is a
subclass here with `facts()` and `plan()`.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mlflow_stack.engine import facts as F

PENDING_DIR = "/var/lib/mlflow-stack/pending"


@dataclass(frozen=True)
class Cmd:
    """One remote command: a shell script, run as root unless `user` is given."""

    script: str
    stdin: bytes | str | None = field(default=None, repr=False)
    user: str | None = None
    timeout: float | None = None

    def root_script(self) -> str:
        """The script as the root shell runs it (as `user` when one is given)."""
        return as_user(self.script, self.user) if self.user else self.script


def as_user(script: str, user: str) -> str:
    """Run `script` (from a root shell) as `user`, with that user's home as HOME."""
    home = f'"$(getent passwd {shlex.quote(user)} | cut -d: -f6)"'
    return f"cd / && HOME={home} runuser -u {shlex.quote(user)} -- sh -c {shlex.quote(script)}"


@dataclass
class Change:
    """What a step would change, and how."""

    summary: str
    commands: list[Cmd]
    path: str | None = None  # the file a diff shows (its old content, if `existed`)
    existed: bool = False  # the file is on the host: the diff compares with its content
    new_text: str | None = field(default=None, repr=False)
    secret: bool = False  # never show content
    starts: tuple[str, ...] = ()  # units (re)started by these commands
    unit_file: bool = False  # a systemd unit file changes: daemon-reload needed
    counts: bool = True  # False for waits: running them is not a change


@dataclass
class PlanContext:
    """Facts of one host, and what this run has done to it so far."""

    facts: dict[str, Any]
    reload_pending: bool = False
    restarted: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)  # ids of the steps changed so far
    pending: set[str] = field(default_factory=set)  # units with a restart pending

    def __getitem__(self, fact: F.Fact) -> Any:
        return self.facts[fact.key]


class Schedule(Enum):
    """When the runner applies a step's change."""

    IN_TURN = "in turn"  # when its turn comes
    # started on the host as soon as the run's facts are in, so that it proceeds while the
    # roles before it run; its turn waits for it and reports its result. Only when no other
    # step of its `exclusive` group changes anything (those run one at a time).
    EARLY = "early"
    # started in its turn; the runner goes on, and a step listing it in `waits_for` (or the
    # end of the run) waits for it and reports its result
    BACKGROUND = "background"
    # applied at the end of the run: a wait nothing after it needs; reported under its role
    AT_END = "at end"


class Step:
    """Base class of all steps (subclasses are dataclasses; these are their defaults)."""

    id: str = ""  # stable identity, for `changed` and `waits_for`
    label: str = ""  # what the report shows
    notify: tuple[str, ...] = ()  # units restarted (once, by a handler) when this changes
    manages: tuple[str, ...] = ()  # units whose pending restarts run with this step's role
    flush_before: bool = False  # pending handlers of the role run before this step
    waits_for: tuple[str, ...] = ()  # ids of background steps to finish before this one
    schedule: Schedule = Schedule.IN_TURN
    exclusive: str = ""  # steps sharing this group never run at the same time ("dpkg")

    def facts(self) -> list[F.Fact]:
        return []

    def plan(self, ctx: PlanContext) -> Change | None:
        raise NotImplementedError


def q(value: str) -> str:
    return shlex.quote(value)


# --- packages --------------------------------------------------------------------------

APT_ENV = "DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a"
APT_OPTS = "-o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold -q -y"
# An install killed half-way leaves dpkg "interrupted": finish it first. dpkg itself has no lock
# timeout (apt's DPkg::Lock::Timeout covers apt-get only), so wait while another apt or dpkg
# holds the lock, e.g. the apt-get a controller killed mid-install left running on the host.
DPKG_FINISH = (
    f"i=0; until out=$({APT_ENV} dpkg --configure -a 2>&1); do "
    'case "$out" in *lock*) ;; *) echo "$out" >&2; exit 2 ;; esac; '
    'i=$((i + 1)); if [ $i -ge 300 ]; then echo "$out" >&2; exit 2; fi; sleep 1; done'
)


@dataclass
class Apt(Step):
    """Debian packages installed (apt-get, non-interactive, waits for the dpkg lock)."""

    packages: tuple[str, ...]
    max_list_age: int = 6 * 3600
    notify: tuple[str, ...] = ()
    schedule: Schedule = Schedule.IN_TURN  # EARLY: installs while the roles before it run
    exclusive: str = "dpkg"

    def __post_init__(self) -> None:
        self.id = "packages:" + ",".join(self.packages)
        self.label = "packages " + " ".join(self.packages)

    def facts(self) -> list[F.Fact]:
        return [F.Packages(self.packages), F.AptListsAge()]

    def plan(self, ctx: PlanContext) -> Change | None:
        installed = ctx[F.Packages(self.packages)]
        missing = [p for p in self.packages if p not in installed]
        if not missing:
            return None
        script = f"{DPKG_FINISH}; "
        age = ctx[F.AptListsAge()]
        if age is None or age > self.max_list_age:
            script += f"{APT_ENV} apt-get {APT_OPTS} update && "
        names = " ".join(q(p) for p in missing)
        script += (
            f"{APT_ENV} apt-get {APT_OPTS} install --no-install-recommends {names} && apt-get clean"
        )
        return Change(f"install {' '.join(missing)}", [Cmd(script, timeout=1800)])


# --- users and directories -------------------------------------------------------------


@dataclass
class SystemUser(Step):
    """A system user with its own group and no login shell."""

    user: str
    home: str
    shell: str = "/usr/sbin/nologin"

    def __post_init__(self) -> None:
        self.id = f"user:{self.user}"
        self.label = f"user {self.user}"

    def facts(self) -> list[F.Fact]:
        return [F.User(self.user)]

    def plan(self, ctx: PlanContext) -> Change | None:
        info = ctx[F.User(self.user)]
        if info is None:
            script = (
                f"useradd --system --user-group --home-dir {q(self.home)} --no-create-home "
                f"--shell {q(self.shell)} {q(self.user)}"
            )
            return Change("created", [Cmd(script)])
        fixes = []
        if info.home != self.home:
            fixes.append(f"--home {q(self.home)}")
        if info.shell != self.shell:
            fixes.append(f"--shell {q(self.shell)}")
        if not fixes:
            return None
        return Change("updated", [Cmd(f"usermod {' '.join(fixes)} {q(self.user)}")])


def root_only(path: str) -> str:
    """Shell that stops (exit 3, one line) unless root alone controls where `path` is: every
    existing directory above it is root's, no symlink, and writable by no group or other
    account, and `path` itself is no symlink. Root writes (and reads into its output) only
    there, so no other account can swap a symlink under what root writes, chowns or shows."""
    p = q(path)
    return (
        f"d=$(dirname -- {p}); while :; do "
        'if [ -e "$d" ] || [ -L "$d" ]; then set -- $(stat -c "%u %a %U" -- "$d"); '
        'if [ -L "$d" ] || [ "$1" != 0 ] || [ $(( 0$2 & 022 )) != 0 ]; then '
        "printf 'refusing to touch %s as root: %s is not root'\\''s alone (owner %s, mode %s); "
        "do it as that account\\n' "
        f'{p} "$d" "$3" "$2" >&2; exit 3; fi; fi; '
        '[ "$d" = / ] && break; d=$(dirname -- "$d"); done; '
        f"if [ -L {p} ]; then printf 'refusing to touch %s as root: it is a symlink\\n' {p} >&2; "
        "exit 3; fi"
    )


def _ownership_fixes(path: str, info: F.PathInfo, owner: str, group: str, mode: int) -> list[str]:
    fixes = []
    if (info.owner, info.group) != (owner, group):
        fixes.append(f"chown -h {q(owner)}:{q(group)} {q(path)}")
    if info.mode != mode:
        fixes.append(f"chmod {mode:o} {q(path)}")
    return [root_only(path), *fixes] if fixes else []


@dataclass
class Directory(Step):
    """A directory with the given owner, group and mode."""

    path: str
    owner: str = "root"
    group: str = "root"
    mode: int = 0o755

    def __post_init__(self) -> None:
        self.id = f"directory:{self.path}"
        self.label = f"directory {self.path}"

    def facts(self) -> list[F.Fact]:
        return [F.PathState(self.path)]

    def plan(self, ctx: PlanContext) -> Change | None:
        info = ctx[F.PathState(self.path)]
        p = q(self.path)
        own = f"chown -h {q(self.owner)}:{q(self.group)} {p} && chmod {self.mode:o} {p}"
        if info is None:
            return Change("created", [Cmd(f"{root_only(self.path)}; mkdir -p {p} && {own}")])
        if info.kind != "directory":
            raise StepError(f"{self.path} exists but is a {info.kind}, not a directory")
        fixes = _ownership_fixes(self.path, info, self.owner, self.group, self.mode)
        if not fixes:
            return None
        return Change("fixed owner/mode", [Cmd(" && ".join(fixes))])


class StepError(Exception):
    """A step cannot be planned: the host is in a state the step will not overwrite."""


# --- files -----------------------------------------------------------------------------


def install_file_script(path: str, owner: str, group: str, mode: int) -> str:
    """Shell script that writes stdin to `path` atomically with owner, group and mode."""
    p = q(path)
    return (
        f'{root_only(path)}; set -e; tmp=$(mktemp "$(dirname {p})/.mlflow-stack.XXXXXX"); '
        'trap \'rm -f "$tmp"\' EXIT; cat > "$tmp"; '
        f'chown {q(owner)}:{q(group)} "$tmp"; chmod {mode:o} "$tmp"; '
        f'mv -f "$tmp" {p}; trap - EXIT'
    )


@dataclass
class File(Step):
    """A file with exactly this content, owner, group and mode (written atomically)."""

    path: str
    content: str | bytes = field(repr=False)
    owner: str = "root"
    group: str = "root"
    mode: int = 0o644
    secret: bool = False
    notify: tuple[str, ...] = ()
    unit_file: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        self.id = f"file:{self.path}"
        self.label = self.label or f"file {self.path}"

    @property
    def data(self) -> bytes:
        return self.content.encode() if isinstance(self.content, str) else self.content

    def facts(self) -> list[F.Fact]:
        return [F.PathState(self.path)]

    def plan(self, ctx: PlanContext) -> Change | None:
        info = ctx[F.PathState(self.path)]
        if info is not None and info.kind not in ("file",):
            raise StepError(f"{self.path} exists but is a {info.kind}, not a regular file")
        new_text = self.content if isinstance(self.content, str) else None
        if info is None or info.sha256 != hashlib.sha256(self.data).hexdigest():
            script = install_file_script(self.path, self.owner, self.group, self.mode)
            return Change(
                "created" if info is None else "updated",
                [Cmd(script, stdin=self.data)],
                path=self.path,
                existed=info is not None,
                new_text=new_text,
                secret=self.secret,
                unit_file=self.unit_file,
            )
        fixes = _ownership_fixes(self.path, info, self.owner, self.group, self.mode)
        if not fixes:
            return None
        return Change("fixed owner/mode", [Cmd(" && ".join(fixes))])


# --- services --------------------------------------------------------------------------


@dataclass
class Service(Step):
    """A systemd unit enabled at boot and running (`running` None: started and stopped by
    others, a socket or its idle exit; left as it is)."""

    unit: str
    enabled: bool = True
    running: bool | None = True

    def __post_init__(self) -> None:
        self.id = f"service:{self.unit}"
        self.label = f"service {self.unit}"
        self.manages = (self.unit,)

    def facts(self) -> list[F.Fact]:
        return [F.Unit(self.unit)]

    def plan(self, ctx: PlanContext) -> Change | None:
        info = ctx[F.Unit(self.unit)]
        u = q(self.unit)
        actions: list[str] = []
        starts: tuple[str, ...] = ()
        if self.enabled and not info.enabled:
            actions.append("enable")
        if not self.enabled and info.enabled:
            actions.append("disable")
        if self.running and not info.active:
            actions.append("start")
            starts = (self.unit,)
        if self.running is False and info.active:
            actions.append("stop")
        if not actions:
            return None
        parts = []
        if ctx.reload_pending or info.need_daemon_reload or not info.exists:
            parts.append("systemctl daemon-reload")
        # A unit seen stopped may have been started since the facts were gathered (a package
        # install starts its service): with a restart pending, restart it so that it runs
        # with the new configuration whatever it did meanwhile.
        start = "restart" if self.unit in ctx.pending else "start"
        if "enable" in actions:
            parts.append(f"systemctl enable {u}")
        if "disable" in actions:
            parts.append(f"systemctl disable {u}")
        if "start" in actions:
            parts.append(f"systemctl {start} {u}")
        if "stop" in actions:
            parts.append(f"systemctl stop {u}")
        if starts:
            parts.append(f"rm -f {PENDING_DIR}/{u}")
        return Change(", ".join(actions), [Cmd(" && ".join(parts))], starts=starts)


@dataclass
class MaskedUnit(Step):
    """A systemd unit that never starts: stopped and masked.

    For a package's unit that would bypass the managed configuration, e.g. Debian's
    `mariadb.socket`, which listens on [::]:3306 at boot and hands MariaDB its sockets instead
    of the configured port and bind address.
    """

    unit: str
    notify: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.id = f"masked:{self.unit}"
        self.label = f"masked {self.unit}"

    def facts(self) -> list[F.Fact]:
        # Live: the unit usually comes with a package installed earlier in the same run
        # (in the background since the start of it), after the facts were first read.
        return [F.LiveUnit(self.unit)]

    def plan(self, ctx: PlanContext) -> Change | None:
        info = ctx[F.LiveUnit(self.unit)]
        if info.load_state in ("masked", "not-found") and not info.active:
            return None
        u = q(self.unit)
        script = f"systemctl disable --now {u} && systemctl mask {u}"
        return Change("stopped, masked", [Cmd(script)])


# --- commands and waits ----------------------------------------------------------------


@dataclass
class Run(Step):
    """A command run only when `when(ctx)` says so, judged from the facts in `needs`."""

    label: str = field()  # required (the base class's default does not apply)
    script: str | Callable[[PlanContext], str]  # a callable builds the script from facts
    when: Callable[[PlanContext], bool]
    needs: tuple[F.Fact, ...] = ()
    stdin: bytes | str | None = field(default=None, repr=False)
    user: str | None = None
    timeout: float | None = 1800
    notify: tuple[str, ...] = ()
    schedule: Schedule = Schedule.IN_TURN
    waits_for: tuple[str, ...] = ()
    id: str = ""  # give one when another step refers to this one (default: from the label)

    def __post_init__(self) -> None:
        self.id = self.id or f"run:{self.label}"

    def facts(self) -> list[F.Fact]:
        return list(self.needs)

    def plan(self, ctx: PlanContext) -> Change | None:
        if not self.when(ctx):
            return None
        script = self.script(ctx) if callable(self.script) else self.script
        cmd = Cmd(script, stdin=self.stdin, user=self.user, timeout=self.timeout)
        return Change("ran", [cmd])


@dataclass
class WaitHttp(Step):
    """Wait until a URL on the host answers with an expected status."""

    label: str = field()  # required (the base class's default does not apply)
    url: str
    timeout: int = 90
    expect: tuple[int, ...] = (200,)
    after: tuple[str, ...] = ()  # units whose (re)start in this run forces a fresh wait
    flush_before: bool = True
    schedule: Schedule = Schedule.IN_TURN  # AT_END: later roles proceed while it starts

    def __post_init__(self) -> None:
        self.id = f"wait:{self.url}"

    def facts(self) -> list[F.Fact]:
        return [F.Http(self.url)]

    def plan(self, ctx: PlanContext) -> Change | None:
        fresh = any(unit in ctx.restarted for unit in self.after)
        if ctx[F.Http(self.url)] in self.expect and not fresh:
            return None
        codes = "|".join(str(c) for c in self.expect)
        script = (
            f"end=$(( $(date +%s) + {self.timeout} )); while :; do "
            f"code=$(curl -s -o /dev/null -m 3 -w '%{{http_code}}' {q(self.url)}); "
            f'case "$code" in {codes}) exit 0;; esac; '
            f'[ "$(date +%s)" -ge "$end" ] && {{ echo "last status $code" >&2; exit 1; }}; '
            "sleep 0.3; done"
        )
        return Change(
            f"wait for {self.url}", [Cmd(script, timeout=self.timeout + 10)], counts=False
        )
