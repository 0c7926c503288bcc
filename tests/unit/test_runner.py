"""The runner on a stand-in host that runs every command in a local shell."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.host import RunResult, Target
from mlflow_stack.engine.report import Reporter, Status
from mlflow_stack.engine.runner import HostJob, Options, Role, converge_host
from mlflow_stack.engine.steps import Run, WaitHttp


@dataclass
class LocalHost:
    """What the runner needs of a `Host`, running commands here instead of over SSH."""

    target: Target = field(default_factory=lambda: Target("local", "127.0.0.1"))
    commands: int = 0

    @property
    def name(self) -> str:
        return self.target.name

    def run(self, script, *, stdin=None, timeout=None, **kwargs) -> RunResult:
        self.commands += 1
        if "systemctl" in script:  # never touch this machine's units (a handler would)
            return RunResult(1, "", "systemctl is not run on the test machine", 0.0)
        proc = subprocess.run(
            ["sh", "-c", script], input=stdin, capture_output=True, text=True, timeout=timeout
        )
        return RunResult(proc.returncode, proc.stdout, proc.stderr, 0.0)

    def check(self, script, what, **kwargs) -> RunResult:
        from mlflow_stack.engine.host import CommandError

        result = self.run(script, **kwargs)
        if not result.ok:
            raise CommandError(what, result)
        return result


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deferred_wait_runs_after_the_later_roles_and_reports_under_its_role(tmp_path):
    marker = tmp_path / "later-role-ran"
    url = f"http://127.0.0.1:{closed_port()}/health"  # nothing answers: the wait fails
    never = F.Shell("never", "false")
    first = Role("first", lambda ctx: [WaitHttp("service answers", url, timeout=1, defer=True)])
    later = Role(
        "later",
        lambda ctx: [Run("touch", f"touch {marker}", when=lambda c: True, needs=(never,))],
    )
    job = HostJob(LocalHost(), [first, later], None)
    recap = converge_host(job, Options(), Reporter(json_mode=True))
    steps = [(r.role, r.step, r.status) for r in recap.results]
    assert steps == [
        ("later", "touch", Status.CHANGED),
        ("first", "service answers", Status.FAILED),
    ]
    assert marker.exists() and recap.failed and "last status 000" in recap.results[-1].summary


def test_deferred_wait_in_check_mode_is_planned_in_place(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/health"
    first = Role("first", lambda ctx: [WaitHttp("service answers", url, timeout=1, defer=True)])
    later = Role("later", lambda ctx: [Run("echo", "true", when=lambda c: True)])
    job = HostJob(LocalHost(), [first, later], None)
    recap = converge_host(job, Options(check=True), Reporter(json_mode=True, check=True))
    assert [(r.role, r.status) for r in recap.results] == [
        ("first", Status.OK),
        ("later", Status.CHANGED),
    ]
