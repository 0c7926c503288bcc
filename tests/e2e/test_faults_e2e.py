"""Faults survived on real sandboxes: a full disk, a controller killed mid-provision, a database
restart during tuning and a restart of the whole host (issue #9, "nothing lost, everything back").

The first two share one bare sandbox of their own; the last two work on the session's
provisioned stack.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.engine.steps import PENDING_DIR
from tests.e2e.conftest import boot
from tests.e2e.helpers import (
    ROOT,
    changed_steps,
    error_line,
    host,
    invoke,
    ok,
    provision_json,
    sh,
    wait_until,
)

pytestmark = pytest.mark.e2e
ROLES = "anaconda,mysql,mlflow_server"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A pristine sandbox and an inventory for it (host `bare`), removed after the module."""
    info = boot()
    inv = tmp_path_factory.mktemp("bare") / "inventory.yaml"

    def write(workers: int = 1) -> None:
        inv.write_text(
            f"groups:\n  server:\n    hosts: [bare]\nhosts:\n  bare:\n    sandbox: {info.name}\n"
            f"    vars:\n      mlflow: {{workers: {workers}}}\n"
        )

    write()
    try:
        yield {"info": info, "inv": inv, "write": write}
    finally:
        sb.down(info.name)


def provision(bare, timeout: int = 1200) -> subprocess.CompletedProcess:
    return invoke(
        "provision", "--host", "bare", "--inventory", str(bare["inv"]), "--roles", ROLES,
        timeout=timeout,
    )  # fmt: skip


def kill_provision_when(bare, check: str, what: str, timeout: float = 600) -> str:
    """Start `invoke provision`, SIGKILL the controller once `check` prints yes on the host.

    Returns the controller's output so far; fails if the run ended before the kill point.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "provision", "--host", "bare", "--inventory",
         str(bare["inv"]), "--roles", ROLES],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    h = host(bare["info"])
    deadline = time.monotonic() + timeout
    # The host polls `check` itself (every 20 ms, up to 2 s per SSH command): the kill follows
    # within one poll, not one SSH round trip per poll.
    poll = f"for i in $(seq 100); do if {check}; then echo yes; break; fi; sleep 0.02; done"
    try:
        while h.run(poll).stdout.strip() != "yes":
            assert proc.poll() is None, f"provision ended before {what}:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        h.close()
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, output
    return output


def test_a_full_disk_fails_clearly_then_converges(bare):
    """Disk full for an env, then for apt: each a one-line error naming the step."""
    h = host(bare["info"])
    sh(
        h,
        "mkdir -p /opt/anaconda && mount -t tmpfs -o size=64m tmpfs /opt/anaconda && "
        "mount -t tmpfs -o size=1m tmpfs /var/cache/apt/archives",
    )
    try:
        line = error_line(provision(bare))
        assert "bare: anaconda: env mlflow:" in line and "No space left on device" in line, line
        sh(h, "umount /opt/anaconda")
        line = error_line(provision(bare))
        assert "bare: mysql: packages mariadb-server" in line, line
        assert "enough free space in /var/cache/apt/archives" in line, line
        sh(h, "umount /var/cache/apt/archives")
    finally:
        h.run("umount /opt/anaconda /var/cache/apt/archives 2>/dev/null; true")
        h.close()
    out = ok(provision(bare))
    assert "failed=0" in out


def test_a_controller_killed_mid_provision_converges_next_time(bare):
    """Killed during apt's and uv's package installs, then between a unit change and its
    restart."""
    h = host(bare["info"])
    # Undo MariaDB and the MLflow schema so that the next runs install and create them again.
    sh(h, "mysql -e 'DROP DATABASE mlflow' && systemctl stop mariadb && "
          "DEBIAN_FRONTEND=noninteractive apt-get -qq purge -y mariadb-server "
          "mariadb-server-core >/dev/null")  # fmt: skip
    # 1. while dpkg unpacks MariaDB: the killed run's apt-get goes on, holding dpkg's lock
    kill_provision_when(bare, "pgrep -f '[-]-status-fd' >/dev/null", "dpkg install")
    # 2. while uv installs an env: the killed run leaves it half-made
    sh(h, "rm -rf /opt/anaconda/envs/demo")
    kill_provision_when(bare, "pgrep -x uv >/dev/null", "uv install")
    out = ok(provision(bare))
    assert "failed=0" in out
    assert sh(h, "/opt/anaconda/envs/demo/bin/python -c 'import mlflow, sklearn'") == ""
    # 3. between the unit's change and its restart: the pending marker is on the host
    bare["write"](workers=2)
    unit = "mlflow-server.service"
    kill_provision_when(bare, f"test -e {PENDING_DIR}/{unit}", "a pending restart")
    assert sh(h, f"ls {PENDING_DIR}").split() == [unit]  # the killed run's restart is owed
    code, report, proc = provision_json(bare["inv"], "--roles", ROLES, host_name="bare")
    assert code == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # The owed restart is paid by the handler, or by the service step when the unit was seen
    # stopped (it restarts, not starts, a unit with a restart pending).
    paid = {f"mlflow_server: handler: restart {unit}", f"mlflow_server: service {unit}"}
    assert paid & set(changed_steps(report, "bare")), changed_steps(report, "bare")
    assert sh(h, f"ls {PENDING_DIR}").strip() == ""
    assert re.search(r"--workers[ =]2\b", sh(h, "ps -eo args")), "not restarted with 2 workers"
    code, report, proc = provision_json(bare["inv"], "--roles", ROLES, host_name="bare")
    assert code == 0 and changed_steps(report, "bare") == [], proc.stdout[-3000:]
    h.close()


def optuna_counts(h, study: str) -> dict[str, int]:
    """Trials of `study` per state, read as root from the Optuna database."""
    query = (
        "SELECT t.state, COUNT(*) FROM optuna.trials t JOIN optuna.studies s "
        f"ON s.study_id = t.study_id WHERE s.study_name = '{study}' GROUP BY t.state"
    )
    result = h.run(f'mysql -N -B -e "{query}"')
    if "doesn't exist" in result.stderr:
        return {}  # Optuna has not created its tables yet
    assert result.ok, result.stderr
    rows = result.stdout.split("\n")
    return {state: int(n) for state, n in (row.split("\t") for row in rows if row)}


def trial_runs(stack, study: str):
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=["wine-tuning"], filter_string=f"tags.`optuna.study` = '{study}'"
    )
    return runs[runs["tags.optuna.state"].notna()]


def test_a_database_restart_during_tuning_loses_no_trial(stack):
    """Two processes share a study in MariaDB (and log to MLflow, also on MariaDB)."""
    h = host(stack.info)
    study, n = f"restart-{int(time.time())}", 200
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tune", "--n-trials", str(n), "--study", study,
         "--jobs-per-host", "2", "--quiet", "--inventory", str(stack.inv)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def twenty_done() -> bool:
            assert proc.poll() is None, "tuning ended early: " + "".join(proc.communicate())
            return optuna_counts(h, study).get("COMPLETE", 0) >= 20

        wait_until(twenty_done, 300, "20 trials")
        sh(h, "systemctl restart mariadb")
        assert proc.poll() is None, "tuning ended before the database restart"
        restarted_at = optuna_counts(h, study).get("COMPLETE", 0)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        h.close()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert restarted_at < n, "the restart did not land during the tuning"
    counts = optuna_counts(host(stack.info), study)
    assert counts.get("COMPLETE") == n and "RUNNING" not in counts, f"{counts}\n{out[-4000:]}"
    runs = trial_runs(stack, study)
    assert runs["tags.optuna.trial"].is_unique, "a trial recorded twice"
    complete = runs[runs["tags.optuna.state"] == "COMPLETE"]
    assert len(complete) == n and (complete["status"] == "FINISHED").all()
    assert len(runs) == sum(counts.values()), (len(runs), counts)  # every finished trial


@pytest.mark.host_restart  # reboots the session's sandbox: runs after every other test
def test_a_host_restart_brings_everything_back(stack):
    import mlflow
    from mlflow import MlflowClient

    def cli(*args: str) -> str:
        return ok(invoke(*args, "--inventory", str(stack.inv), timeout=900))

    run_id = re.search(r"^run ([0-9a-f]{32}) ", cli("train", "--alpha", "0.3"), re.M).group(1)
    study = f"reboot-{int(time.time())}"
    cli("tune", "--n-trials", "12", "--study", study, "--quiet")
    champion = "models:/wine-elasticnet@champion"
    cli("serve", "--model", champion, "--name", "reboot", "--port", "54420")
    mlflow.set_tracking_uri(stack.tracking_uri)
    client = MlflowClient()
    version = client.get_model_version_by_alias("wine-elasticnet", "champion").version
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    trials = optuna_counts(host(stack.info), study)

    rebooted = ok(invoke("sandbox.reboot", "--name", stack.info.name, timeout=600))
    assert f"{stack.info.name} rebooted" in rebooted
    info = sb.load(stack.info.name)
    assert info is not None and info.address == stack.info.address  # the same host, back
    stack.tunnel.restart()  # its SSH connection went with the old boot
    h = host(info)
    try:
        wait_until(lambda: "all healthy" in invoke("status", "--inventory", str(stack.inv))
                   .stdout, 180, "all healthy after the reboot")  # fmt: skip
        for unit in ("mariadb", "mlflow-server", "jupyter", "mlflow-model@reboot"):
            state = sh(h, f"systemctl is-enabled {unit}; systemctl is-active {unit}").split()
            assert state == ["enabled", "active"], f"{unit}: {state}"
        assert optuna_counts(h, study) == trials
        # MariaDB still on its configured loopback port (Debian's mariadb.socket would put it
        # on [::]:3306 at boot: the mysql role masks it)
        listening = [
            line.split()[3] for line in sh(h, "ss -Hltnp").splitlines() if "mariadbd" in line
        ]
        assert listening == [f"127.0.0.1:{stack.ports['mysql']}"], listening
    finally:
        h.close()
    assert float(client.get_run(run_id).data.params["alpha"]) == 0.3
    assert sorted(a.path for a in client.list_artifacts(run_id)) == artifacts
    assert client.get_model_version_by_alias("wine-elasticnet", "champion").version == version
    model = mlflow.pyfunc.load_model(champion)  # its artifacts, fetched through the server
    assert model.metadata.run_id
    assert re.search(r"\d", cli("predict", "--name", "reboot"))
