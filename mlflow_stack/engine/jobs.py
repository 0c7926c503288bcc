"""Background jobs: a step's commands run on the host as a transient systemd unit, which
outlives the SSH session (and the controller); the run waits for it later and replays its
output and exit code as the step's result."""

from __future__ import annotations

import secrets as _random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_stack.engine.host import CommandError, HostError
from mlflow_stack.engine.steps import Change, Step, q

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host

JOBS_DIR = "/var/lib/mlflow-stack/jobs"


def background_start_script(job: str, script: str, jobs_dir: str = JOBS_DIR) -> str:
    """Run `script` as the transient unit `job`; its stdout, stderr and exit code land in
    `jobs_dir`/job.{out,err,rc}."""
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


@dataclass
class Job:
    """A step's change running in the background, and the role it is reported under."""

    role: str
    step: Step
    change: Change
    unit: str
    early: bool  # started with the run (not in its turn)


@dataclass
class Outcome:
    job: Job
    error: str | None
    seconds: float


class BackgroundJobs:
    """The jobs a run started on one host, by step id."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.running: dict[str, Job] = {}

    def __contains__(self, step_id: str) -> bool:
        return step_id in self.running

    def start(self, role: str, step: Step, change: Change, script: str, *, early: bool) -> None:
        """Start `script` (the change's commands, as root) as a job; `HostError` if it
        could not be started."""
        unit = f"mlflow-stack-job-{_random.token_hex(4)}"
        self.host.check(background_start_script(unit, script), step.label)
        self.running[step.id] = Job(role, step, change, unit, early)

    def wait(self, step_id: str) -> Outcome:
        """Wait for the job of `step_id`; its error (None when it succeeded)."""
        job = self.running.pop(step_id)
        started = time.monotonic()
        timeout = max((c.timeout or 1800) for c in job.change.commands)
        try:
            self.host.check(background_wait_script(job.unit), job.step.label, timeout=timeout)
            error = None
        except (CommandError, HostError) as exc:
            error = str(exc)
        return Outcome(job, error, time.monotonic() - started)
