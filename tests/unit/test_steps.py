"""Steps: facts → planned commands (nothing runs on a host; shell snippets run locally)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import (
    DPKG_FINISH,
    Apt,
    Directory,
    File,
    MaskedUnit,
    PlanContext,
    Run,
    Service,
    StepError,
    SystemUser,
    WaitHttp,
    install_file_script,
    root_only,
)


def ctx(**facts) -> PlanContext:
    return PlanContext({key: value for key, value in facts.items()})


def plan(step, values: dict, **kwargs):
    return step.plan(PlanContext({f.key: values[f.key] for f in step.facts()}, **kwargs))


def test_apt_noop_when_installed():
    step = Apt(("mariadb-server", "curl"))
    values = {
        F.Packages(step.packages).key: {"mariadb-server": "1", "curl": "2"},
        F.AptListsAge().key: 10,
    }
    assert plan(step, values) is None


def test_apt_installs_only_missing_and_updates_stale_lists():
    step = Apt(("mariadb-server", "curl"))
    values = {F.Packages(step.packages).key: {"curl": "2"}, F.AptListsAge().key: None}
    change = plan(step, values)
    (cmd,) = change.commands
    assert change.summary == "install mariadb-server"
    assert "apt-get -o DPkg::Lock::Timeout=300" in cmd.script
    assert " update && " in cmd.script and "install --no-install-recommends mariadb-server" in (
        cmd.script
    )
    assert "DEBIAN_FRONTEND=noninteractive" in cmd.script
    values[F.AptListsAge().key] = 60
    assert " update " not in plan(step, values).commands[0].script


def fake_dpkg(tmp_path, body: str) -> dict:
    """An environment whose `dpkg` is a shell script counting its calls in tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text(f"#!/bin/sh\necho x >> {tmp_path}/calls\n{body}\n")
    (bin_dir / "dpkg").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_dpkg_finish_waits_for_a_held_lock(tmp_path):
    # dpkg has no lock timeout: a run right after a killed one finds apt still installing.
    env = fake_dpkg(
        tmp_path,
        f'[ "$(wc -l < {tmp_path}/calls)" -ge 3 ] && exit 0\n'
        'echo "dpkg: error: dpkg frontend lock was locked by another process with pid 7" >&2\n'
        "exit 2",
    )
    proc = subprocess.run(["sh", "-c", DPKG_FINISH], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls").read_text().count("x") == 3


def test_dpkg_finish_fails_at_once_on_other_errors(tmp_path):
    env = fake_dpkg(tmp_path, 'echo "dpkg: error: parsing file /var/lib/dpkg/status" >&2; exit 2')
    proc = subprocess.run(["sh", "-c", DPKG_FINISH], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "parsing file" in proc.stderr
    assert (tmp_path / "calls").read_text().count("x") == 1


def test_file_absent_present_and_perms():
    step = File("/etc/x.conf", "a=1\n", owner="root", group="mlflow", mode=0o640)
    key = F.PathState("/etc/x.conf").key
    created = plan(step, {key: None})
    assert created.summary == "created"
    assert created.commands[0].stdin == b"a=1\n"
    same = F.PathInfo("file", 0o640, "root", "mlflow", 4, hashlib.sha256(b"a=1\n").hexdigest())
    assert plan(step, {key: same}) is None
    wrong_mode = F.PathInfo("file", 0o644, "root", "root", 4, same.sha256)
    fix = plan(step, {key: wrong_mode})
    assert fix.commands[0].script == (
        f"{root_only('/etc/x.conf')} && chown -h root:mlflow /etc/x.conf && chmod 640 /etc/x.conf"
    )
    other = F.PathInfo("file", 0o640, "root", "mlflow", 4, "0" * 64)
    assert plan(step, {key: other}).summary == "updated"
    with pytest.raises(StepError, match="not a regular file"):
        plan(step, {key: F.PathInfo("directory", 0o755, "root", "root", 0)})


@pytest.fixture
def roots_dir():
    """A directory only root controls, as the trees root manages on a host are (tmp_path is
    under the world-writable /tmp: root must refuse to write there)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (it checks root-owned directories)")
    path = Path(tempfile.mkdtemp(dir="/root", prefix=".mlflow-stack-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_install_file_script_is_atomic_and_keeps_mode(roots_dir):
    target = roots_dir / "out.txt"
    script = install_file_script(str(target), "root", "root", 0o600)
    subprocess.run(["sh", "-c", script], input=b"secret\n", check=True)
    assert target.read_bytes() == b"secret\n"
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in roots_dir.iterdir()] == ["out.txt"]  # no temp file left


def run_as_root(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], input=stdin, capture_output=True)


def test_root_writes_nowhere_another_account_controls(roots_dir, tmp_path):
    """Root's writes stop (one line, nothing written) where another account could swap a
    symlink under them: a directory that account owns, a symlinked directory, a file that is a
    symlink, a world-writable directory."""
    canary = roots_dir / "canary"
    canary.write_text("root's\n")
    theirs = roots_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody's
    (theirs / "f").symlink_to(canary)
    link = roots_dir / "link"
    link.symlink_to(theirs)
    mine = roots_dir / "mine"
    mine.mkdir()
    (mine / "f").symlink_to(canary)
    cases = {
        theirs / "f": "is not root's alone (owner nobody",
        link / "f": "is not root's alone",
        mine / "f": "it is a symlink",
        tmp_path / "f": "is not root's alone",  # under /tmp
    }
    for path, why in cases.items():
        for script in (
            install_file_script(str(path), "root", "root", 0o600),
            plan(
                File(str(path), "x", mode=0o600),
                {
                    F.PathState(str(path)).key: F.PathInfo(
                        "file", 0o644, "nobody", "nogroup", 1, hashlib.sha256(b"x").hexdigest()
                    )
                },
            )
            .commands[0]
            .script,
        ):
            proc = run_as_root(script, b"pwned\n")
            assert proc.returncode == 3 and why in proc.stderr.decode(), (path, proc.stderr)
    assert canary.read_text() == "root's\n" and canary.stat().st_uid == 0
    assert oct(canary.stat().st_mode & 0o777) != "0o600"


def test_directory_and_user():
    d = Directory("/opt/mlflow", owner="mlflow", group="mlflow", mode=0o750)
    key = F.PathState("/opt/mlflow").key
    assert "mkdir -p /opt/mlflow" in plan(d, {key: None}).commands[0].script
    ok = F.PathInfo("directory", 0o750, "mlflow", "mlflow", 4096)
    assert plan(d, {key: ok}) is None
    u = SystemUser("mlflow", home="/opt/mlflow")
    ukey = F.User("mlflow").key
    assert "useradd --system --user-group" in plan(u, {ukey: None}).commands[0].script
    same = F.UserInfo("mlflow", 998, 998, "/opt/mlflow", "/usr/sbin/nologin")
    assert plan(u, {ukey: same}) is None


def unit(load="loaded", active="active", enabled="enabled", reload=False):
    return F.UnitInfo(load, active, "running", enabled, reload)


def test_service_plans():
    s = Service("mlflow-server.service")
    key = F.Unit(s.unit).key
    assert plan(s, {key: unit()}) is None
    fresh = plan(s, {key: unit("not-found", "inactive", "")})
    assert fresh.commands[0].script.startswith(
        "systemctl daemon-reload && systemctl enable mlflow-server.service && "
        "systemctl start mlflow-server.service"
    )
    assert fresh.starts == ("mlflow-server.service",)
    start = plan(s, {key: unit(active="failed")})
    assert start.commands[0].script.startswith("systemctl start mlflow-server.service")
    reload = plan(s, {key: unit(active="inactive")}, reload_pending=True)
    assert reload.commands[0].script.startswith("systemctl daemon-reload && ")


def test_service_turned_off_is_stopped_and_disabled():
    s = Service("demo-wine-warm.service", enabled=False, running=False)
    key = F.Unit(s.unit).key
    change = plan(s, {key: unit()})
    assert change.summary == "disable, stop"
    assert change.commands[0].script == (
        "systemctl disable demo-wine-warm.service && systemctl stop demo-wine-warm.service"
    )
    assert plan(s, {key: unit(active="inactive", enabled="disabled")}) is None
    assert plan(s, {key: unit("not-found", "inactive", "")}) is None


def test_masked_unit_plans():
    s = MaskedUnit("mariadb.socket", notify=("mariadb.service",))
    key = F.LiveUnit(s.unit).key
    change = plan(s, {key: unit(active="active", enabled="enabled")})  # Debian's default
    assert change.commands[0].script == (
        "systemctl disable --now mariadb.socket && systemctl mask mariadb.socket"
    )
    assert s.notify == ("mariadb.service",)  # MariaDB still holds the socket's 3306
    assert plan(s, {key: unit("masked", "inactive", "masked")}) is None
    assert plan(s, {key: unit("not-found", "inactive", "")}) is None  # MySQL has none
    assert plan(s, {key: unit("masked", "active", "masked")}) is not None  # masked, still up


def test_guarded_command():
    guard = F.Shell("db exists", "mysql -e 'use mlflow'")
    step = Run(
        "create db",
        "mysql",
        when=lambda c: not c[guard].ok,
        needs=(guard,),
        stdin="CREATE DATABASE mlflow;",
    )
    assert plan(step, {guard.key: F.ShellResult(0, "")}) is None
    change = plan(step, {guard.key: F.ShellResult(1, "")})
    assert change.commands[0].stdin == "CREATE DATABASE mlflow;"
    assert "CREATE" not in change.commands[0].script  # SQL travels on stdin only


def test_wait_http_is_not_a_change_and_rewaits_after_restart():
    w = WaitHttp("mlflow healthy", "http://127.0.0.1:5000/health", after=("mlflow.service",))
    key = F.Http(w.url).key
    assert plan(w, {key: 200}) is None
    again = plan(w, {key: 200}, restarted={"mlflow.service"})
    assert again is not None and again.counts is False
    assert plan(w, {key: 0}).counts is False


def test_service_seen_stopped_with_a_pending_restart_is_restarted():
    """apt starts a package's service before its config file lands: start would keep it."""
    s = Service("mariadb.service")
    key = F.Unit(s.unit).key
    change = plan(s, {key: unit("loaded", "inactive", "enabled")}, pending={"mariadb.service"})
    assert "systemctl restart mariadb.service" in change.commands[0].script
    assert change.starts == ("mariadb.service",)
