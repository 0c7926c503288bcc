"""The runner: read facts in batches, plan each step, apply the differences, run handlers.

Hosts converge in parallel; on each, roles run in order and steps in their turn, except as
their `Schedule` says (early, background, at the end). The run's state is three things: the
facts read (`FactStore`), the restarts owed (`Handlers`) and the jobs started in the
background (`BackgroundJobs`).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_stack.engine.context import RoleContext, base_facts
from mlflow_stack.engine.handlers import Handlers, with_markers
from mlflow_stack.engine.host import CommandError, Host, HostError
from mlflow_stack.engine.jobs import BackgroundJobs, Outcome
from mlflow_stack.engine.probing import FactStore, Prefetch, probe
from mlflow_stack.engine.report import HostRecap, Reporter, Status, StepResult
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    Change,
    PlanContext,
    Schedule,
    Step,
    StepError,
    q,
    root_only,
)
from mlflow_stack.secrets import mask

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars

__all__ = ["HostJob", "Options", "Role", "converge", "converge_host", "probe"]


@dataclass
class HostJob:
    """One host to converge: where, which roles, with which variables."""

    host: Host
    roles: Sequence[Role]
    vars: HostVars | None
    prefetch: Prefetch | None = None  # facts probed before the roles were built
    private_address: str = ""  # how the other hosts reach it ("" = its SSH address)
    workers: tuple[str, ...] = ()  # a server's tuning workers


@dataclass
class Options:
    check: bool = False  # plan only
    diff: bool = False  # show the diffs of changed files


class HostRun:
    """One host's run: plans and applies steps, owes and pays restarts, reports."""

    def __init__(self, job: HostJob, options: Options, reporter: Reporter, recap: HostRecap):
        self.host = job.host
        self.options = options
        self.reporter = reporter
        self.recap = recap
        self.facts = FactStore(job.host)
        self.handlers = Handlers()
        self.jobs = BackgroundJobs(job.host)
        self.changed: set[str] = set()  # ids of the steps that changed something
        self.at_end: list[tuple[str, Step, Change]] = []

    # --- reporting ----------------------------------------------------------------------

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
        if change.path and change.existed:
            shown = self.host.run(f"{root_only(change.path)}; cat -- {q(change.path)}")
            if shown.rc == 3:  # not root's alone: its content is not root's to show
                return f"    ({shown.stderr.strip()})"
            old = shown.stdout
        lines = difflib.unified_diff(
            old.splitlines(keepends=True),
            (change.new_text or "").splitlines(keepends=True),
            fromfile=f"{target} (host)",
            tofile=f"{target} (wanted)",
        )
        return "".join(
            "    " + line if line.endswith("\n") else "    " + line + "\n" for line in lines
        )

    # --- changes ------------------------------------------------------------------------

    @staticmethod
    def script_of(step: Step, change: Change) -> list[str]:
        """The root scripts of a change; the first marks the restarts it will owe."""
        scripts = [cmd.root_script() for cmd in change.commands]
        if step.notify and scripts:
            scripts[0] = with_markers(step.notify, scripts[0])
        return scripts

    def apply(self, step: Step, change: Change) -> None:
        for script, cmd in zip(self.script_of(step, change), change.commands, strict=True):
            self.host.check(script, step.label, stdin=cmd.stdin, timeout=cmd.timeout)

    def applied(self, step: Step, change: Change) -> None:
        """What a change applied on the host means for the rest of the run."""
        if change.counts:
            self.facts.changed_host()
        if change.unit_file:
            self.handlers.reload_pending = True
        self.handlers.started(change.starts)

    def counted(self, step: Step, change: Change) -> None:
        """A change that counts (applied, or planned in check mode) and what it owes."""
        if change.counts:
            self.changed.add(step.id)
            self.handlers.notify(step.notify, change.starts)

    def plan_context(self) -> PlanContext:
        h = self.handlers
        return PlanContext(
            self.facts.values, h.reload_pending, h.restarted, self.changed, set(h.pending)
        )

    # --- background jobs ----------------------------------------------------------------

    def start_early(self, plans: list[tuple[Role, list[Step]]]) -> None:
        """Start the changes of `EARLY` steps now, unless another step of their `exclusive`
        group changes something too (those run one at a time, in their turn)."""
        if self.options.check:
            return
        groups = {s.exclusive for _, steps in plans for s in steps if s.schedule is Schedule.EARLY}
        ctx = self.plan_context()
        wanted: list[tuple[str, Step, Change]] = []
        for role, steps in plans:
            for step in steps:
                if step.schedule is not Schedule.EARLY and (
                    not step.exclusive or step.exclusive not in groups
                ):
                    continue
                try:
                    change = step.plan(ctx)
                except (StepError, KeyError):
                    return
                if change is None:
                    continue
                if step.schedule is not Schedule.EARLY or any(c.stdin for c in change.commands):
                    return
                wanted.append((role.name, step, change))
        for role, step, change in wanted:
            try:
                self.start_job(role, step, change, early=True)
            except (CommandError, HostError):
                continue  # not started: the step runs in the foreground in its turn

    def start_job(self, role: str, step: Step, change: Change, *, early: bool) -> None:
        script = " && ".join(f"{{ {s}\n}}" for s in self.script_of(step, change))
        self.jobs.start(role, step, change, script, early=early)

    def finish_job(self, step_id: str) -> bool:
        """Wait for a background job and report it as its step's result."""
        outcome: Outcome = self.jobs.wait(step_id)
        job = outcome.job
        if outcome.error is not None:
            self.emit(job.role, job.step.label, Status.FAILED, outcome.error, outcome.seconds)
            return False
        self.applied(job.step, job.change)
        self.counted(job.step, job.change)
        since = "the start of the run" if job.early else "its turn"
        summary = f"{job.change.summary} (in the background since {since})"
        self.emit(job.role, job.step.label, Status.CHANGED, summary, outcome.seconds)
        return True

    def finish_all_jobs(self) -> bool:
        """Jobs no step has waited for yet: wait for each and report it."""
        return all([self.finish_job(step_id) for step_id in list(self.jobs.running)])

    # --- steps and roles ----------------------------------------------------------------

    def run_step(self, role: str, step: Step) -> bool:
        if step.id in self.jobs:
            return self.finish_job(step.id)
        for step_id in step.waits_for:
            if step_id in self.jobs and not self.finish_job(step_id):
                return False
        started = time.monotonic()

        def failed(exc: Exception) -> bool:
            self.emit(role, step.label, Status.FAILED, str(exc), time.monotonic() - started)
            return False

        stale = self.facts.stale(step.facts(), live_only=True)
        if stale:
            try:
                self.facts.read(stale)
            except HostError as exc:
                return failed(exc)
        try:
            change = step.plan(self.plan_context())
        except StepError as exc:
            return failed(exc)
        if change is None:
            self.emit(role, step.label, Status.OK, seconds=time.monotonic() - started)
            return True
        checking = self.options.check
        if step.schedule is Schedule.AT_END and not change.counts and not checking:
            self.at_end.append((role, step, change))
            return True
        diff = self.diff_for(change)
        if step.schedule is Schedule.BACKGROUND and not checking:
            try:
                self.start_job(role, step, change, early=False)
            except (CommandError, HostError) as exc:
                return failed(exc)
            return True  # reported once waited for
        if not checking:
            try:
                self.apply(step, change)
            except (CommandError, HostError) as exc:
                return failed(exc)
            self.applied(step, change)
        self.counted(step, change)
        status = Status.CHANGED if change.counts else Status.OK
        self.emit(role, step.label, status, change.summary, time.monotonic() - started, diff)
        return True

    def run_role(self, role: str, steps: list[Step]) -> bool:
        """Each step in order; handlers run before a step that waits for them and at the end."""
        units = [unit for step in steps for unit in step.manages]
        for step in steps:
            if step.flush_before and not self.flush_handlers(role, units):
                return False
            if not self.run_step(role, step):
                return False
        return self.flush_handlers(role, units)

    def flush_handlers(self, role: str, units: list[str], *, only_active: bool = False) -> bool:
        """Restart those of `units` that are owed a restart (`only_active`: if running)."""
        due = self.handlers.due(units)
        if not due:
            return True
        started = time.monotonic()
        name = "handler: restart " + ", ".join(due)
        if not self.options.check:
            script = self.handlers.restart_script(due, only_active=only_active)
            try:
                self.host.check(script, name, timeout=300)
            except (CommandError, HostError) as exc:
                self.emit(role, name, Status.FAILED, str(exc), time.monotonic() - started)
                return False
            self.facts.changed_host()
        self.handlers.done(due, applied=not self.options.check)
        self.emit(role, name, Status.CHANGED, "restarted", time.monotonic() - started)
        return True

    def run_at_end(self) -> bool:
        """The waits left for the end of the run, in order; each reported under its role."""
        ok = True
        for role, step, change in self.at_end:
            started = time.monotonic()
            try:
                self.apply(step, change)
                status, summary = Status.OK, change.summary
            except (CommandError, HostError) as exc:
                status, summary, ok = Status.FAILED, str(exc), False
            seconds = time.monotonic() - started
            self.emit(role, step.label, status, summary, seconds)
            self.recap.role_seconds[role] = self.recap.role_seconds.get(role, 0.0) + seconds
        self.at_end.clear()
        return ok

    def run_roles(self, plans: list[tuple[Role, list[Step]]]) -> None:
        """Every role in order, then what is owed at the end of the run."""
        for role, steps in plans:
            role_started = time.monotonic()
            self.facts.read(self.facts.stale([f for s in steps for f in s.facts()]))
            ok = self.run_role(role.name, steps)
            self.recap.role_seconds[role.name] = time.monotonic() - role_started
            if not ok:
                break
        else:
            # the jobs' notifications are owed before the last handlers run
            if self.finish_all_jobs():
                self.flush_handlers("handlers", list(self.handlers.pending), only_active=True)
        self.finish_all_jobs()
        self.run_at_end()


def converge_host(job: HostJob, options: Options, reporter: Reporter) -> HostRecap:
    """Converge one host: base facts, build the steps, read their facts, then role by role.

    With a `prefetch`, both reads are usually answered by the probe it started earlier.
    """
    started = job.prefetch.started if job.prefetch else time.monotonic()
    recap = HostRecap(job.host.name)
    run = HostRun(job, options, reporter, recap)
    try:
        run.facts.known = job.prefetch.result() if job.prefetch else {}
        base = probe(job.host, base_facts(), run.facts.known)
        os_info, size, pending, host_secrets = (base[f.key] for f in base_facts())
        ctx = RoleContext(
            job.host.name,
            os_info,
            job.vars,
            size,
            host_secrets,
            address=job.host.target.address,
            private_address=job.private_address or job.host.target.address,
            workers=job.workers,
        )
        run.handlers.pending = list(pending)
        # A run that died after changing a unit file may not have reloaded systemd either.
        run.handlers.reload_pending = bool(pending)
        try:
            plans = [(role, role.build(ctx)) for role in job.roles]
        except StepError as exc:
            raise HostError(f"{job.host.name}: {exc}") from None
        needed = [f for _, steps in plans for s in steps for f in s.facts()]
        run.facts.read(needed)
        run.facts.known = {}  # later reads (after changes, beside jobs) go to the host
        if job.prefetch:
            job.prefetch.remember([*base_facts(), *needed])
        run.start_early(plans)
        run.run_roles(plans)
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
