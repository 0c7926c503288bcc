"""The field on this machine: the whole stack on Debian sid with Oracle MySQL 9 and on Debian
trixie with MariaDB 11.8 (one test each: a converge shared by every check), and the original
walkthrough inside the original instance size (1 vCPU, 1 GiB) on bookworm.

Per distribution: converge from bare, a second converge changes nothing, train, a shared
study tuned by two processes while the database restarts, serve and predict, check-mysql, a
rotation of the MLflow database password the server follows, a reboot after which everything
is healthy.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from mlflow_stack import layout
from mlflow_stack import sandbox as sb
from tests.e2e.helpers import (
    ROOT,
    changed_steps,
    host,
    inventory,
    invoke,
    ok,
    provision_json,
    sh,
    wait_until,
)
from tests.e2e.test_faults_e2e import optuna_counts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIELD = {
    # distro: (mysql.server, its unit, what `SELECT VERSION()` starts with)
    "sid": ("mysql", "mysql", "9."),
    "trixie": ("mariadb", "mariadb", "11.8"),
}


def cli(inv, *args: str, env: dict | None = None, timeout: int = 1200) -> str:
    return ok(invoke(*args, "--inventory", str(inv), env=env, timeout=timeout))


def tune_during_a_database_restart(inv, h, unit: str, study: str, n: int) -> str:
    """`invoke tune` of `n` trials by two processes sharing `study`; the database restarts
    once 15 are done. Returns tune's output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tune", "--n-trials", str(n), "--study", study,
         "--jobs-per-host", "2", "--inventory", str(inv)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def fifteen_done() -> bool:
            assert proc.poll() is None, "tuning ended early: " + "".join(proc.communicate())
            return optuna_counts(h, study).get("COMPLETE", 0) >= 15

        wait_until(fifteen_done, 600, "15 trials")
        sh(h, f"systemctl restart {unit}")
        restarted_at = optuna_counts(h, study).get("COMPLETE", 0)
        out, err = proc.communicate(timeout=1200)
        out += err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert restarted_at < n, "the restart did not land during the tuning"
    return out


@pytest.mark.parametrize("distro", sorted(FIELD))
def test_the_whole_stack_on_a_distribution(distro, fresh_sandbox, tmp_path):
    server, unit, version = FIELD[distro]
    info = fresh_sandbox(distro=distro)
    inv = inventory(tmp_path, info, vars_yaml=f"mysql: {{server: {server}}}")
    h = host(info)
    try:
        # converge from bare; then nothing to change
        code, report, proc = provision_json(inv)
        assert code == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        code, report, proc = provision_json(inv)
        assert code == 0 and changed_steps(report) == [], changed_steps(report)
        assert sh(h, "mysql -N -B -e 'SELECT VERSION()'").startswith(version)
        if server == "mysql":
            accounts = sh(h, "mysql -N -B -e \"SELECT user, plugin FROM mysql.user "
                             "WHERE user IN ('mlflow', 'optuna')\"")  # fmt: skip
            assert set(accounts.split()) == {"mlflow", "optuna", "caching_sha2_password"}
            assert sh(h, "mysql -N -B -e 'SELECT @@log_bin'").strip() == "0"
            plugin = "SELECT plugin_status FROM information_schema.plugins WHERE plugin_name"
            assert sh(h, f"mysql -N -B -e \"{plugin} = 'mysqlx'\"").strip() == "DISABLED"

        # train; tune a shared study while the database restarts; serve; predict
        trained = cli(inv, "train", "--alpha", "0.42")
        run_id = re.search(r"^run ([0-9a-f]{32}) ", trained, re.M).group(1)
        study, n = f"field-{distro}", 60
        tuned = tune_during_a_database_restart(inv, h, unit, study, n)
        counts = optuna_counts(h, study)
        assert counts.get("COMPLETE") == n and "RUNNING" not in counts, f"{counts}\n{tuned}"
        cli(inv, "serve", "--run", run_id, "--name", "field", "--port", "54460")
        assert 3.0 < float(cli(inv, "predict", "--name", "field").strip()) < 9.0
        checks = cli(inv, "check-mysql")
        assert f"service {unit}.service" in checks and "schema revision" in checks

        # the MLflow database password rotated: applied, and the server follows
        rotated = {"MLFLOW_DB_PASSWORD": f"rotated-{distro}-{int(time.time())}"}
        code, report, proc = provision_json(inv, env=rotated)
        assert code == 0, proc.stdout[-3000:]
        changed = changed_steps(report)
        assert "mysql: databases mlflow, optuna, accounts mlflow and optuna" in changed
        assert any("restart mlflow-server.service" in step for step in changed), changed
        again = cli(inv, "train", "--alpha", "0.1", env=rotated)
        assert re.search(r"^run [0-9a-f]{32} ", again, re.M)
        ok(invoke("check-mysql", "--inventory", str(inv), env=rotated))
        secret = sh(h, f"cat {layout.secret_path('db_password')}").strip()
        assert secret == rotated["MLFLOW_DB_PASSWORD"]

        # a reboot: every service back, healthy, the served model answering
        rebooted = ok(invoke("sandbox.reboot", "--name", info.name, timeout=600))
        assert f"{info.name} rebooted" in rebooted
        h.close()
        h = host(sb.load(info.name))
        wait_until(
            lambda: "all healthy" in invoke("status", "--inventory", str(inv)).stdout,
            240,
            "all healthy after the reboot",
        )
        assert 3.0 < float(cli(inv, "predict", "--name", "field").strip()) < 9.0
        assert optuna_counts(h, study) == counts
        code, report, proc = provision_json(inv, env=rotated)
        assert code == 0 and changed_steps(report) == [], changed_steps(report)
    finally:
        h.close()


def test_the_walkthrough_inside_one_cpu_and_one_gib(fresh_sandbox):
    """`invoke demo` on a 1 vCPU / 1 GiB bookworm sandbox: the small profile is chosen from
    the host's facts; no process is OOM-killed (the memory cgroup's counter and the kernel's
    log); every service healthy at the end, one model served."""
    info = fresh_sandbox(cpus=1, memory="1G")
    proc = invoke("demo", "--host", info.name, "--trials", "50", "--port", "54470", timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "prediction (sample wine)" in proc.stdout
    assert sb.oom_kills(info.name) == 0, "OOM kills in the sandbox's memory cgroup"
    h = host(info)
    try:
        assert sh(h, "nproc").strip() == "1"
        kernel = sh(h, "journalctl -k -b --no-pager -q | grep -ci 'out of memory' || true")
        assert kernel.strip() == "0", "the kernel logged an OOM kill"
        conf = sh(h, "cat /etc/mysql/mariadb.conf.d/60-mlflow-stack.cnf")
        assert "# sizing: small (1 CPU, 1.0 GiB)" in conf
        assert sh(h, "systemctl is-active mlflow-model@wine").strip() == "active"
    finally:
        h.close()
    states = invoke("status", "--host", info.name)
    assert "all healthy" in states.stdout, states.stdout
    assert "on demand" in states.stdout or "demo-wine-warm" in states.stdout
