"""The runner on a stand-in host that runs every command in a local shell."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field

from mlflow_stack.engine import facts as F
from mlflow_stack.engine import jobs, runner
from mlflow_stack.engine.host import RunResult, Target
from mlflow_stack.engine.report import HostRecap, Reporter, Status
from mlflow_stack.engine.runner import HostJob, Options, Role, converge_host
from mlflow_stack.engine.steps import Apt, MaskedUnit, Run, Schedule, WaitHttp


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
    first = Role(
        "first", lambda ctx: [WaitHttp("service answers", url, timeout=1, schedule=Schedule.AT_END)]
    )
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
    first = Role(
        "first", lambda ctx: [WaitHttp("service answers", url, timeout=1, schedule=Schedule.AT_END)]
    )
    later = Role("later", lambda ctx: [Run("echo", "true", when=lambda c: True)])
    job = HostJob(LocalHost(), [first, later], None)
    recap = converge_host(job, Options(check=True), Reporter(json_mode=True, check=True))
    assert [(r.role, r.status) for r in recap.results] == [
        ("first", Status.OK),
        ("later", Status.CHANGED),
    ]


FAKE_SYSTEMD_RUN = """#!/bin/sh
# systemd-run stand-in: runs the command (the last two arguments: sh -c SCRIPT) detached.
for last; do :; done
nohup sh -c "$last" >/dev/null 2>&1 &
"""


def test_background_job_runs_detached_and_replays_output_and_exit_code(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text(FAKE_SYSTEMD_RUN)
    (bin_dir / "systemd-run").chmod(0o755)
    (bin_dir / "systemctl").write_text("#!/bin/sh\nexit 0\n")  # the unit looks active
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    jobs_dir = str(tmp_path / "jobs")
    # `exit` (or a failing `set -e` script) still leaves an exit status behind
    start = jobs.background_start_script("job1", "echo out; echo err >&2; exit 3", jobs_dir)
    subprocess.run(["sh", "-c", start], check=True)
    waited = subprocess.run(
        ["sh", "-c", jobs.background_wait_script("job1", jobs_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (waited.returncode, waited.stdout, waited.stderr) == (3, "out\n", "err\n")
    assert not list((tmp_path / "jobs").iterdir())  # cleaned up


def test_background_job_gone_without_status_fails_clearly(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\nexit 3\n")  # the unit is gone
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    waited = subprocess.run(
        ["sh", "-c", jobs.background_wait_script("job2", str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert waited.returncode == 1 and "ended without an exit status" in waited.stderr


@dataclass
class RecordingHost(LocalHost):
    """Records commands; answers the two probes from canned facts."""

    facts: dict = field(default_factory=dict)
    scripts: list = field(default_factory=list)

    def run(self, script, *, stdin=None, timeout=None, **kwargs) -> RunResult:
        self.commands += 1
        self.scripts.append(script)
        return RunResult(0, "", "", 0.0)


def started_early(apt_steps: list, installed: dict) -> list[str]:
    host = RecordingHost()
    job = HostJob(host, [], None)
    run = runner.HostRun(job, Options(), Reporter(json_mode=True), HostRecap("h"))
    for step in apt_steps:
        run.facts.values[F.Packages(step.packages).key] = installed
        run.facts.values[F.AptListsAge().key] = 10
    run.start_early([(Role("r", lambda ctx: apt_steps), apt_steps)])
    started = sorted(run.jobs.running)
    assert len(host.scripts) == len(started)  # one systemd-run each, nothing else
    assert all("systemd-run" in script for script in host.scripts)
    return started


def test_background_install_starts_only_when_no_other_apt_runs():
    base = Apt(("python3", "curl"))
    db = Apt(("mariadb-server",), schedule=Schedule.EARLY)
    present = {"python3": "3", "curl": "7"}
    assert started_early([base, db], present) == ["packages:mariadb-server"]
    assert started_early([base, db], {}) == []  # curl missing: one apt at a time
    everything = {**present, "mariadb-server": "10"}
    assert started_early([base, db], everything) == []  # nothing to install


def test_masked_unit_reads_its_unit_again_after_a_change_in_the_run():
    """A unit that a package step of the same run brought is masked in that run."""
    masked = MaskedUnit("example.socket")
    fact = masked.facts()[0]
    assert fact.live  # the runner re-reads it before planning once the host changed


@dataclass
class FakeSystemdHost(LocalHost):
    """A local host whose systemd-run and systemctl are the stand-ins in `bin_dir`."""

    bin_dir: str = ""

    def run(self, script, *, stdin=None, timeout=None, **kwargs) -> RunResult:
        self.commands += 1
        proc = subprocess.run(
            ["sh", "-c", script.replace(jobs.JOBS_DIR, f"{self.bin_dir}/jobs")],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": f"{self.bin_dir}:/usr/bin:/bin"},
        )
        return RunResult(proc.returncode, proc.stdout, proc.stderr, 0.0)


def fake_systemd(tmp_path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text(FAKE_SYSTEMD_RUN)
    (bin_dir / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("systemd-run", "systemctl"):
        (bin_dir / tool).chmod(0o755)
    return str(bin_dir)


def test_background_run_is_waited_for_by_a_later_step_and_reported_under_its_role(tmp_path):
    done, later = tmp_path / "job-done", tmp_path / "later"
    job = Run(
        "slow job",
        f"sleep 0.5 && touch {done}",
        when=lambda c: True,
        schedule=Schedule.BACKGROUND,
        id="the-job",
    )
    check = f"test -e {done} && touch {later}"  # fails if the job has not finished
    needs_job = Run("needs it", check, when=lambda c: True, waits_for=("the-job",))
    first = Role("first", lambda ctx: [job])
    second = Role("second", lambda ctx: [Run("meanwhile", "true", when=lambda c: True), needs_job])
    host = FakeSystemdHost(bin_dir=fake_systemd(tmp_path))
    recap = converge_host(HostJob(host, [first, second], None), Options(), Reporter(json_mode=True))
    assert [(r.role, r.step, r.status) for r in recap.results] == [
        ("second", "meanwhile", Status.CHANGED),
        ("first", "slow job", Status.CHANGED),
        ("second", "needs it", Status.CHANGED),
    ]
    assert later.exists() and "in the background" in recap.results[1].summary


def test_background_run_nobody_waits_for_is_reported_at_the_end_and_its_failure_fails(tmp_path):
    job = Run(
        "doomed", "echo broken >&2; exit 4", when=lambda c: True, schedule=Schedule.BACKGROUND
    )
    after = Run("after", "true", when=lambda c: True)
    roles = [Role("first", lambda ctx: [job]), Role("second", lambda ctx: [after])]
    host = FakeSystemdHost(bin_dir=fake_systemd(tmp_path))
    recap = converge_host(HostJob(host, roles, None), Options(), Reporter(json_mode=True))
    assert [(r.role, r.step, r.status) for r in recap.results] == [
        ("second", "after", Status.CHANGED),
        ("first", "doomed", Status.FAILED),
    ]
    assert recap.failed and "broken" in recap.results[-1].summary


def test_background_run_in_check_mode_is_planned_in_place(tmp_path):
    job = Run("job", "touch should-not-exist", when=lambda c: True, schedule=Schedule.BACKGROUND)
    host = FakeSystemdHost(bin_dir=fake_systemd(tmp_path))
    recap = converge_host(
        HostJob(host, [Role("r", lambda ctx: [job])], None),
        Options(check=True),
        Reporter(json_mode=True, check=True),
    )
    assert [(r.step, r.status) for r in recap.results] == [("job", Status.CHANGED)]
    assert not (tmp_path / "bin" / "jobs").exists()
