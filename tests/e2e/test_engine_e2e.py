"""The engine against a real sandbox host: converge, idempotence, check/diff modes, handlers."""

from __future__ import annotations

import io

import pytest

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.report import Reporter, Status
from mlflow_stack.engine.runner import HostJob, Options, Role, converge
from mlflow_stack.engine.steps import (
    PENDING_DIR,
    Apt,
    Directory,
    File,
    Run,
    Service,
    SystemUser,
    WaitHttp,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.vars import defaults
from tests.e2e.helpers import host, sh

pytestmark = pytest.mark.e2e
UNIT = "probe-web.service"


def probe_role(port: int, fail: bool = False) -> Role:
    """A small real service: python3's http.server as a hardened unit, restarted on change."""

    def build(ctx):
        unit = (
            "[Unit]\nDescription=engine probe web server\n[Service]\nUser=probe\n"
            f"ExecStart=/usr/bin/python3 -m http.server {port} --bind 127.0.0.1 "
            "--directory /opt/probe\nRestart=on-failure\nNoNewPrivileges=yes\n"
            "ProtectSystem=strict\n[Install]\nWantedBy=multi-user.target\n"
        )
        steps = [
            Apt(("jq",)),
            SystemUser("probe", home="/opt/probe"),
            # Root writes only where root alone controls the directory (see root_only).
            Directory("/opt/probe", "root", "root", 0o755),
            File(
                "/opt/probe/setenv.sh",
                render(
                    "demo/setenv.sh.j2",
                    tracking_uri=f"http://127.0.0.1:{port}",
                    data_path="/opt/probe/data.csv",
                    env_prefix="/opt/probe/env",
                ),
                "root",
                "root",
                0o644,
            ),
            File(f"/etc/systemd/system/{UNIT}", unit, notify=(UNIT,), unit_file=True),
            Service(UNIT),
        ]
        if fail:
            steps.append(Run("fail on purpose", "echo boom >&2; exit 3", when=lambda c: True))
        steps.append(WaitHttp("probe answers", f"http://127.0.0.1:{port}/", after=(UNIT,)))
        return steps

    return Role("probe", build)


def run(info, role: Role, *, check=False, diff=False):
    stream = io.StringIO()
    h = host(info)
    try:
        (recap,) = converge(
            [HostJob(h, [role], defaults())], Options(check, diff), Reporter(stream, check=check)
        )
    finally:
        h.close()
    return recap, stream.getvalue()


def changed(recap) -> list[str]:
    return [r.step for r in recap.results if r.status == Status.CHANGED]


def remove_probe(h) -> None:
    """Start from a host without anything the probe role manages."""
    sh(
        h,
        f"systemctl disable --now {UNIT} 2>/dev/null; rm -f /etc/systemd/system/{UNIT} "
        f"{PENDING_DIR}/{UNIT}; systemctl daemon-reload; userdel probe 2>/dev/null; "
        "rm -rf /opt/probe; DEBIAN_FRONTEND=noninteractive apt-get -qq remove -y jq "
        ">/dev/null 2>&1; true",
    )


def test_converge_idempotence_check_diff_and_handlers(sandbox):
    remove_probe(host(sandbox))
    first, out = run(sandbox, probe_role(18081))
    assert not first.failed, out
    assert {"packages jq", f"service {UNIT}", "file /opt/probe/setenv.sh"} <= set(changed(first))
    h = host(sandbox)
    assert sh(h, "jq --version").startswith("jq-")
    assert "http://127.0.0.1:18081" in sh(h, "cat /opt/probe/setenv.sh")
    assert sh(h, f"systemctl is-active {UNIT}").strip() == "active"

    second, out = run(sandbox, probe_role(18081))
    assert changed(second) == [], f"not idempotent, changed on the 2nd run: {changed(second)}"
    assert second.ssh_commands <= 3, out

    unit_before = sh(h, f"cat /etc/systemd/system/{UNIT}")
    checked, out = run(sandbox, probe_role(18082), check=True, diff=True)
    assert f"file /etc/systemd/system/{UNIT}" in changed(checked)
    assert "-ExecStart=/usr/bin/python3 -m http.server 18081" in out
    assert "+ExecStart=/usr/bin/python3 -m http.server 18082" in out
    assert "would change" in out and "check mode: nothing was changed" in out
    assert sh(h, f"cat /etc/systemd/system/{UNIT}") == unit_before
    assert sh(h, f"ls {PENDING_DIR} 2>/dev/null || true").strip() == ""

    applied, out = run(sandbox, probe_role(18082))
    handler_lines = [r for r in applied.results if r.step.startswith("handler: restart")]
    assert len(handler_lines) == 1, out
    assert sh(h, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18082/") == "200"
    h.close()


def test_pending_restart_survives_a_failed_run(sandbox):
    run(sandbox, probe_role(18083))
    failed, out = run(sandbox, probe_role(18084, fail=True))
    assert failed.failed and "boom" in out
    h = host(sandbox)
    assert UNIT in sh(h, f"ls {PENDING_DIR}")  # the restart is remembered on the host
    pid_before = sh(h, f"systemctl show -p MainPID --value {UNIT}").strip()

    recovered, out = run(sandbox, probe_role(18084))
    assert not recovered.failed, out
    assert any(r.step.startswith("handler: restart") for r in recovered.results), out
    assert sh(h, f"systemctl show -p MainPID --value {UNIT}").strip() != pid_before
    assert sh(h, f"ls {PENDING_DIR}").strip() == ""
    final, out = run(sandbox, probe_role(18084))
    assert changed(final) == [], out
    h.close()


def test_facts_from_the_real_host(sandbox):
    h = host(sandbox)
    from mlflow_stack.engine.runner import probe

    values = probe(h, [F.OsRelease(), F.User("ubuntu"), F.Unit("ssh.service")])
    assert values[F.OsRelease().key].family == "debian"
    assert values[F.User("ubuntu").key].home == "/home/ubuntu"
    assert values[F.Unit("ssh.service").key].active
    assert h.commands == 1
    h.close()
