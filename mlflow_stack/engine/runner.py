"""The runner: probe facts in batches, plan each step, apply the differences, run handlers."""

from __future__ import annotations

import difflib
import secrets as _random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext, base_facts
from mlflow_stack.engine.host import CommandError, Host, HostError
from mlflow_stack.engine.probing import Known, Prefetch, probe
from mlflow_stack.engine.report import HostRecap, Reporter, Status, StepResult
from mlflow_stack.engine.steps import (
    PENDING_DIR,
    Apt,
    Change,
    PlanContext,
    Run,
    Service,
    Step,
    StepError,
    q,
)
from mlflow_stack.secrets import mask


@dataclass(frozen=True)
class Role:
    """A named list of steps, built from the host's context."""

    name: str
    build: Callable[[RoleContext], list[Step]]


@dataclass
class HostJob:
    """One host to converge: where, which roles, with which variables."""

    host: Host
    roles: Sequence[Role]
    vars: Any
    prefetch: Prefetch | None = None  # facts probed before the roles were built


@dataclass
class Options:
    check: bool = False
    diff: bool = False


JOBS_DIR = "/var/lib/mlflow-stack/jobs"


def background_start_script(job: str, script: str, jobs_dir: str = JOBS_DIR) -> str:
    """Run `script` as the transient unit `job` (it outlives the SSH session); its stdout,
    stderr and exit code land in `jobs_dir`/job.{out,err,rc}."""
    path = f"{jobs_dir}/{job}"
    body = (
        f"( {script}\n) >{path}.out 2>{path}.err </dev/null; "
        f"echo $? >{path}.rc.tmp && mv {path}.rc.tmp {path}.rc"
    )
    return (
        f"mkdir -p {jobs_dir} && rm -f {path}.out {path}.err {path}.rc && "
        f"systemd-run --quiet --collect --unit={job} sh -c {q(body)}"
    )


def background_wait_script(job: str, jobs_dir: str = JOBS_DIR) -> str:
    """Wait for a job from `background_start_script`; replay its output and exit code."""
    path = f"{jobs_dir}/{job}"
    return (
        f"while [ ! -e {path}.rc ]; do "
        f"if ! systemctl -q is-active {job}; then [ -e {path}.rc ] && break; "
        f'echo "background job {job} ended without an exit status" >&2; exit 1; fi; '
        "sleep 0.3; done; "
        f"cat {path}.out; cat {path}.err >&2; rc=$(cat {path}.rc); "
        f'rm -f {path}.out {path}.err {path}.rc; exit "$rc"'
    )


def as_user(script: str, user: str) -> str:
    """Run `script` (from a root shell) as `user`, with that user's home as HOME."""
    home = f'"$(getent passwd {q(user)} | cut -d: -f6)"'
    return f"cd / && HOME={home} runuser -u {q(user)} -- sh -c {q(script)}"


@dataclass
class _HostRun:
    """State of one host's run: facts, pending handlers, the recap being built."""

    job: HostJob
    options: Options
    reporter: Reporter
    recap: HostRecap
    facts: dict[str, Any] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # units to restart
    reload_pending: bool = False
    restarted: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)  # names of steps that changed this run
    dirty: bool = False
    generation: int = 0  # bumped by every change made on the host
    read_at: dict[str, int] = field(default_factory=dict)  # live fact -> generation read at
    known: Known = field(default_factory=dict)  # prefetched facts, for the first two reads
    deferred: list[tuple[str, Step, Change]] = field(default_factory=list)  # waits for the end
    # steps started in the background: step name -> (role, step, job unit, change)
    background: dict[str, tuple[str, Step, str, Change]] = field(default_factory=dict)

    @property
    def host(self) -> Host:
        return self.job.host

    def emit(
        self,
        role: str,
        step: str,
        status: Status,
        summary: str = "",
        seconds: float = 0.0,
        diff: str | None = None,
    ) -> None:
        result = StepResult(
            self.host.name, role, step, status, mask(summary), seconds, mask(diff) if diff else None
        )
        self.recap.results.append(result)
        self.reporter.step(result)

    def diff_for(self, change: Change) -> str | None:
        if not self.options.diff or (change.new_text is None and not change.secret):
            return None
        target = change.path or "(new file)"
        if change.secret:
            return f"    (content of {target} hidden: it holds secrets)"
        old = ""
        if change.path:
            old = self.host.run(f"cat {q(change.path)}").stdout
        lines = difflib.unified_diff(
            old.splitlines(keepends=True),
            (change.new_text or "").splitlines(keepends=True),
            fromfile=f"{target} (host)",
            tofile=f"{target} (wanted)",
        )
        return "".join(
            "    " + line if line.endswith("\n") else "    " + line + "\n" for line in lines
        )

    def apply(self, step: Step, change: Change) -> None:
        for index, cmd in enumerate(change.commands):
            script = as_user(cmd.script, cmd.user) if cmd.user else cmd.script
            if index == 0 and step.notify:
                script = self.with_markers(step, script)
            self.host.check(script, step.name, stdin=cmd.stdin, timeout=cmd.timeout)

    def read(self, facts: list[F.Fact]) -> None:
        """Probe `facts` into the run's values, remembering when live ones were read."""
        self.facts.update(probe(self.host, facts, self.known))
        self.read_at.update((f.key, self.generation) for f in facts if f.live)

    def changed_host(self) -> None:
        self.dirty = True
        self.generation += 1

    @staticmethod
    def with_markers(step: Step, script: str) -> str:
        """`script` preceded by the pending-restart markers of the units `step` notifies."""
        markers = " ".join(f"{PENDING_DIR}/{q(u)}" for u in step.notify)
        return f"mkdir -p {PENDING_DIR} && touch {markers} && {{ {script}\n}}"

    def start_background(self, plans: list[tuple[Role, list[Step]]]) -> None:
        """Start the changes of `background` package steps on the host now (see `Apt`)."""
        if self.options.check:
            return
        ctx = PlanContext(self.facts)
        wanted: list[tuple[str, Step, Change]] = []
        for role, steps in plans:
            for step in steps:
                if not isinstance(step, Apt):
                    continue
                try:
                    change = step.plan(ctx)
                except (StepError, KeyError):
                    return
                if change is None:
                    continue
                if not step.background or any(c.stdin or c.user for c in change.commands):
                    return  # another apt runs in the foreground: keep them one at a time
                wanted.append((role.name, step, change))
        for role, step, change in wanted:
            try:
                self.launch(role, step, change)
            except (CommandError, HostError):
                continue  # not started: the step runs in the foreground in its turn

    def launch(self, role: str, step: Step, change: Change) -> None:
        """Run `change` on the host as a transient unit (it outlives this run) and go on."""
        job = f"mlflow-stack-job-{_random.token_hex(4)}"
        scripts = (as_user(c.script, c.user) if c.user else c.script for c in change.commands)
        script = " && ".join(f"{{ {s}\n}}" for s in scripts)
        if step.notify:
            script = self.with_markers(step, script)
        self.host.check(background_start_script(job, script), step.name)
        self.background[step.name] = (role, step, job, change)

    def finish_background(self, name: str) -> bool:
        """Wait for background step `name`'s job and report it as that step's result."""
        role, step, job, change = self.background.pop(name)
        started = time.monotonic()
        timeout = max((c.timeout or 1800) for c in change.commands)
        try:
            self.host.check(background_wait_script(job), step.name, timeout=timeout)
        except (CommandError, HostError) as exc:
            self.emit(role, step.name, Status.FAILED, str(exc), time.monotonic() - started)
            return False
        self.changed_host()
        self.changed.add(step.name)
        for unit in step.notify:
            if unit not in self.pending:
                self.pending.append(unit)
        since = "the start of the run" if isinstance(step, Apt) else "its turn"
        summary = f"{change.summary} (in the background since {since})"
        self.emit(role, step.name, Status.CHANGED, summary, time.monotonic() - started)
        return True

    def finish_all_background(self) -> bool:
        """Jobs no step has waited for yet: wait for each and report it."""
        return all([self.finish_background(name) for name in list(self.background)])

    def run_step(self, role: str, step: Step) -> bool:
        if step.name in self.background:
            return self.finish_background(step.name)
        for name in step.waits_for:
            if name in self.background and not self.finish_background(name):
                return False
        started = time.monotonic()
        stale = [
            f for f in step.facts() if f.live and self.read_at.get(f.key, -1) < self.generation
        ]
        if stale:
            try:
                self.read(stale)
            except HostError as exc:
                self.emit(role, step.name, Status.FAILED, str(exc), time.monotonic() - started)
                return False
        ctx = PlanContext(
            self.facts, self.reload_pending, self.restarted, self.changed, set(self.pending)
        )
        try:
            change = step.plan(ctx)
        except StepError as exc:
            self.emit(role, step.name, Status.FAILED, str(exc), time.monotonic() - started)
            return False
        if change is None:
            self.emit(role, step.name, Status.OK, seconds=time.monotonic() - started)
            return True
        if getattr(step, "defer", False) and not change.counts and not self.options.check:
            self.deferred.append((role, step, change))
            return True
        diff = self.diff_for(change)
        if isinstance(step, Run) and step.background and not self.options.check:
            try:
                self.launch(role, step, change)
            except (CommandError, HostError) as exc:
                self.emit(role, step.name, Status.FAILED, str(exc), time.monotonic() - started)
                return False
            return True  # reported once waited for
        if not self.options.check:
            try:
                self.apply(step, change)
            except (CommandError, HostError) as exc:
                self.emit(role, step.name, Status.FAILED, str(exc), time.monotonic() - started)
                return False
            if change.counts:
                self.changed_host()
            if change.unit_file:
                self.reload_pending = True
            for unit in change.starts:
                self.restarted.add(unit)
                if unit in self.pending:
                    self.pending.remove(unit)
        if change.counts:
            self.changed.add(step.name)
            for unit in step.notify:
                if unit not in self.pending and unit not in change.starts:
                    self.pending.append(unit)
        status = Status.CHANGED if change.counts else Status.OK
        self.emit(role, step.name, status, change.summary, time.monotonic() - started, diff)
        return True

    def run_deferred(self) -> bool:
        """The waits deferred to the end of the run, in order; each reported under its role."""
        ok = True
        for role, step, change in self.deferred:
            started = time.monotonic()
            try:
                self.apply(step, change)
                status, summary = Status.OK, change.summary
            except (CommandError, HostError) as exc:
                status, summary, ok = Status.FAILED, str(exc), False
            seconds = time.monotonic() - started
            self.emit(role, step.name, status, summary, seconds)
            self.recap.role_seconds[role] = self.recap.role_seconds.get(role, 0.0) + seconds
        self.deferred.clear()
        return ok

    def run_role(self, role: str, steps: list[Step]) -> bool:
        """Each step in order; handlers run before a step that waits for them and at the end."""
        units = owned_units(steps)
        for step in steps:
            if step.flush_before and not self.flush_handlers(role, units):
                return False
            if not self.run_step(role, step):
                return False
        return self.flush_handlers(role, units)

    def flush_handlers(self, role: str, units: list[str], *, only_active: bool = False) -> bool:
        """Restart `units` (after one daemon-reload if a unit file changed).

        `only_active`: units no role of this run manages are restarted only if running.
        """
        units = [u for u in units if u in self.pending]
        if not units:
            return True
        started = time.monotonic()
        parts = ["systemctl daemon-reload"] if self.reload_pending else []
        if only_active:
            parts += [
                f"{{ ! systemctl -q is-active {q(u)} || systemctl restart {q(u)}; }}" for u in units
            ]
        else:
            parts += [f"systemctl restart {q(u)}" for u in units]
        parts.append("rm -f " + " ".join(f"{PENDING_DIR}/{q(u)}" for u in units))
        name = "handler: restart " + ", ".join(units)
        if not self.options.check:
            try:
                self.host.check(" && ".join(parts), name, timeout=300)
            except (CommandError, HostError) as exc:
                self.emit(role, name, Status.FAILED, str(exc), time.monotonic() - started)
                return False
            self.reload_pending = False
            self.restarted.update(units)
            self.changed_host()
        for unit in units:
            self.pending.remove(unit)
        self.emit(role, name, Status.CHANGED, "restarted", time.monotonic() - started)
        return True


def owned_units(steps: list[Step]) -> list[str]:
    """Units a role manages (it has a `Service` step for them): their handlers run with it."""
    return [s.unit for s in steps if isinstance(s, Service)]


def converge_host(job: HostJob, options: Options, reporter: Reporter) -> HostRecap:
    """Converge one host: base probe, build steps, one facts probe, then role by role.

    With a `prefetch`, both probes are usually answered by the one it started earlier.
    """
    started = job.prefetch.started if job.prefetch else time.monotonic()
    recap = HostRecap(job.host.name)
    run = _HostRun(job, options, reporter, recap)
    try:
        run.known = job.prefetch.result() if job.prefetch else {}
        base = probe(job.host, base_facts(), run.known)
        os_info, pending, host_secrets = (base[f.key] for f in base_facts())
        ctx = RoleContext(
            job.host.name,
            os_info,
            job.vars,
            host_secrets,
            options.check,
            address=job.host.target.address,
        )
        run.pending = list(pending)
        # A run that died after changing a unit file may not have reloaded systemd either.
        run.reload_pending = bool(pending)
        try:
            plans = [(role, role.build(ctx)) for role in job.roles]
        except StepError as exc:
            raise HostError(f"{job.host.name}: {exc}") from None
        needed = [f for _, steps in plans for s in steps for f in s.facts()]
        run.read(needed)
        run.known = {}  # later reads (after changes, or beside background jobs) go to the host
        if job.prefetch:
            job.prefetch.remember([*base_facts(), *needed])
        run.start_background(plans)
        for role, steps in plans:
            role_started = time.monotonic()
            if run.dirty:
                run.read([f for s in steps for f in s.facts()])
                run.dirty = False
            ok = run.run_role(role.name, steps)
            recap.role_seconds[role.name] = time.monotonic() - role_started
            if not ok:
                break
        else:
            # the jobs' notifications are owed before the last handlers run
            if run.finish_all_background():
                run.flush_handlers("handlers", list(run.pending), only_active=True)
        run.finish_all_background()
        run.run_deferred()
    except HostError as exc:
        recap.error = mask(str(exc))
    finally:
        recap.ssh_commands = job.host.commands
        recap.seconds = time.monotonic() - started
    return recap


def converge(jobs: list[HostJob], options: Options, reporter: Reporter) -> list[HostRecap]:
    """Converge every host in parallel; the recap is printed once all are done."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), 16))) as pool:
        recaps = list(pool.map(lambda job: converge_host(job, options, reporter), jobs))
    reporter.recap(recaps)
    return recaps
