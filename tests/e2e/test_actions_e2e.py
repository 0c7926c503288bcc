"""Remote actions on the provisioned stack, through the CLI as a user runs them: train, tune,
serve, predict, check-mysql, status, urls and tunnel, and their refusals of bad input.
Multi-host tuning is tests/e2e/test_multihost_e2e.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pymysql
import pytest

from tests.data import WINE_CSV
from tests.e2e.helpers import (
    Tunnel,
    error_line,
    host,
    invoke,
    ok,
    provision_json,
    sh,
    wait_until,
)

pytestmark = pytest.mark.e2e
SERVE_PORT = 54400


def cli(stack, *args, timeout=900):
    return invoke(*args, "--inventory", str(stack.inv), timeout=timeout)


@pytest.fixture(scope="module")
def trained(stack):
    runs = {}
    for alpha in ("0.42", "0.9"):
        out = ok(cli(stack, "train", "--alpha", alpha, "--experiment", "e2e-train"))
        runs[alpha] = re.search(r"^run ([0-9a-f]{32}) ", out, re.M).group(1)
        assert "rmse=" in out and "/#/experiments/" in out
        # Forked from the warm runner, not a cold Python (which would be a silent fallback).
        assert '"process": "warm"' in out
    return runs


def test_train_twice_records_two_runs_with_their_params(stack, trained):
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    for alpha, run_id in trained.items():
        run = mlflow.get_run(run_id)
        assert float(run.data.params["alpha"]) == float(alpha)
        assert 0 < run.data.metrics["rmse"] < 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--alpha", "abc"], "--alpha 'abc': not a number"),
        (["train", "--alpha", "-1"], "--alpha -1: must be >= 0"),
        (["train", "--l1-ratio", "1.5"], "--l1-ratio 1.5: must be between 0 and 1"),
        (["tune", "--n-trials", "0"], "--n-trials 0: must be 1 to"),
        (["serve", "--run", "0" * 32, "--port", str(SERVE_PORT)], "unknown run id"),
        (["serve", "--model", "models:/wine-elasticnet@nosuch"], "unknown model alias"),
        (["serve"], "give exactly one of --run"),
        (["predict", "--name", "nosuch"], "no served model named 'nosuch'"),
        (["provision", "--host", "nosuchhost"], "unknown host 'nosuchhost'"),
        (["provision", "--roles", "mysql,redis"], "--roles: unknown role 'redis'"),
    ],
)
def test_bad_input_is_one_clear_line(stack, args, message):
    proc = cli(stack, *args, timeout=300)
    assert message in error_line(proc)


def test_tune_on_one_host_registers_the_champion(stack):
    out = ok(cli(stack, "tune", "--n-trials", "40", "--quiet"))
    assert re.search(r"study wine-elasticnet: 40 trials", out)
    assert re.search(r"champion: models:/wine-elasticnet@champion -> version \d+", out)


def test_serve_predict_and_serve_again(stack, trained):
    run_id = trained["0.42"]
    out = ok(cli(stack, "serve", "--run", run_id, "--name", "e2e", "--port", str(SERVE_PORT)))
    assert "started/updated" in out and f"http://127.0.0.1:{SERVE_PORT}/invocations" in out
    curl = out.strip().splitlines()[-1]
    assert curl.startswith("curl ")
    h = host(stack.info)
    try:
        answer = sh(h, curl)  # the printed curl, run where it is meant to run: on the host
        assert json.loads(answer)["predictions"][0] > 0
        again = ok(cli(stack, "serve", "--run", run_id, "--name", "e2e", "--port", str(SERVE_PORT)))
        assert "already serving (no change)" in again
        prediction = ok(cli(stack, "predict", "--name", "e2e"))
        assert 3.0 < float(prediction.strip()) < 9.0
        assert sh(h, "systemctl is-active mlflow-model@e2e.service").strip() == "active"
    finally:
        h.close()


def test_serve_with_two_workers_and_predict_a_csv_of_wines(stack, trained, tmp_path):
    port = str(SERVE_PORT + 2)
    out = ok(cli(stack, "serve", "--run", trained["0.9"], "--name", "two", "--port", port,
                 "--workers", "2"))  # fmt: skip
    assert "started/updated" in out
    h = host(stack.info)
    try:
        main = sh(h, "systemctl show -p MainPID --value mlflow-model@two.service").strip()
        workers = sh(h, f"pgrep -P {main} -f model_server.py || true").split()
        assert len(workers) == 2, workers  # forked from the one that loaded the model
        rows = WINE_CSV.read_text().splitlines()[:6]  # the header and five wines
        data = tmp_path / "five.csv"
        data.write_text("\n".join(rows) + "\n")
        predictions = ok(cli(stack, "predict", "--name", "two", "--data", str(data))).split()
        assert len(predictions) == 5 and all(3.0 < float(p) < 9.0 for p in predictions)
    finally:
        ok(cli(stack, "serve", "--stop", "--name", "two"))
        h.close()


def test_serving_the_champion_and_a_bad_payload(stack, tmp_path):
    ok(cli(stack, "tune", "--n-trials", "10", "--quiet"))
    out = ok(
        cli(
            stack,
            "serve",
            "--model",
            "models:/wine-elasticnet@champion",
            "--name",
            "champ",
            "--port",
            str(SERVE_PORT + 1),
        )
    )
    assert "(version" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataframe_split": {"columns": ["alcohol"], "data": [[12.8]]}}))
    line = error_line(cli(stack, "predict", "--name", "champ", "--data", str(bad)))
    assert "the model server refused the request (HTTP 400)" in line
    ok(cli(stack, "serve", "--stop", "--name", "champ"))
    h = host(stack.info)
    assert sh(h, "systemctl is-active mlflow-model@champ.service || true").strip() != "active"
    h.close()


def test_serve_on_a_busy_port_starts_nothing(stack, trained):
    busy = stack.ports["jupyter"]
    proc = cli(stack, "serve", "--run", trained["0.9"], "--name", "busy", "--port", str(busy))
    assert f"port {busy} on e2e is already in use" in error_line(proc)
    h = host(stack.info)
    assert sh(h, "test -e /etc/mlflow-models/busy.env && echo yes || echo no").strip() == "no"
    h.close()


def test_check_mysql_fails_when_the_database_is_down_and_provision_repairs_it(stack):
    out = ok(cli(stack, "check-mysql"))
    assert "FAIL" not in out and "user mlflow logs in (PyMySQL over an SSH tunnel)" in out
    h = host(stack.info)
    sh(h, "systemctl stop mariadb")
    try:
        proc = cli(stack, "check-mysql")
        assert "service mariadb.service: inactive" in error_line(proc)
        assert "systemctl start mariadb.service" in proc.stderr
        # Provisioning repairs it: the database state is read again once MariaDB runs, so
        # nothing is planned from the stopped server's (unreadable) state.
        fixed = ok(cli(stack, "provision", "--roles", "mysql"))
        assert "service mariadb.service: start" in fixed and "failed=0" in fixed
        assert "FAIL" not in ok(cli(stack, "check-mysql"))
    finally:
        h.run("systemctl start mariadb")
        h.close()


def test_the_warm_runner_notices_changed_demo_code(stack, trained):
    """Code changed behind its back: that run starts cold, the runner restarts, the next is warm."""
    h = host(stack.info)
    try:
        sh(h, "touch /opt/demo/demo_wine/model.py")
        cold = ok(cli(stack, "train", "--alpha", "0.3", "--experiment", "e2e-train"))
        assert '"process": "cold"' in cold
        warm = ok(cli(stack, "train", "--alpha", "0.3", "--experiment", "e2e-train"))
        assert '"process": "warm"' in warm
    finally:
        h.close()


def test_status_and_urls(stack):
    out = ok(cli(stack, "status"))
    assert "all healthy" in out and "mlflow-server.service" in out and "3.17.2" in out
    assert re.search(r"ok +demo-wine-warm\.service +active +ok \(socket\)", out)
    urls = ok(cli(stack, "urls"))
    assert "MLflow   http://127.0.0.1:5000/" in urls and "token=<token>" in urls
    revealed = ok(cli(stack, "urls", "--reveal"))
    h = host(stack.info)
    token = sh(h, "cat /etc/mlflow-stack/secrets/jupyter_token").strip()
    h.close()
    assert f"token={token}" in revealed


def test_tunnel_forwards_mlflow_jupyter_and_the_database(stack):
    tunnel = Tunnel(stack.inv, database=True)
    tunnel.start(timeout=60)  # fails (with what it printed) if it does not say it forwards
    try:
        assert set(tunnel.ports) >= {5000, 8888, 3306}
        with urllib.request.urlopen(f"{tunnel.url(5000)}/health", timeout=10) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"{tunnel.url(8888)}/api", timeout=10) as answer:
            assert answer.status == 200
        h = host(stack.info)
        password = sh(h, "cat /etc/mlflow-stack/secrets/db_password").strip()
        h.close()
        conn = pymysql.connect(
            host="127.0.0.1", port=tunnel.local(3306), user="mlflow", password=password,
            database="mlflow", connect_timeout=10,
        )  # fmt: skip
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM experiments")
            assert cur.fetchone()[0] >= 1
        conn.close()
    finally:
        tunnel.stop()
    assert tunnel.proc.returncode == 0  # Ctrl-C ends it cleanly ("tunnel closed")


def test_wrong_key_and_sudo_password_are_clear_errors(stack, tmp_path):
    info = stack.info
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    h = host(info)
    sh(
        h,
        "id nosudo >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo nosudo; "
        "install -d -m 700 -o nosudo -g nosudo /home/nosudo/.ssh; "
        "install -m 600 -o nosudo -g nosudo /home/ubuntu/.ssh/authorized_keys "
        "/home/nosudo/.ssh/authorized_keys",
    )
    h.close()
    inv = tmp_path / "inventory.yaml"
    inv.write_text(  # reached by address: its own known_hosts (never the user's ~/.ssh)
        f"defaults:\n  known_hosts: {tmp_path / 'known_hosts'}\n"
        "hosts:\n"
        f"  badkey:\n    address: {info.address}\n    key: {stranger}\n"
        f"  nosudo:\n    address: {info.address}\n    user: nosudo\n"
        f"    key: {info.key_file}\n"
    )
    proc = invoke("provision", "--host", "badkey", "--inventory", str(inv), timeout=120)
    assert f"SSH authentication failed for ubuntu@{info.address}:22" in error_line(proc)
    proc = invoke("provision", "--host", "nosudo", "--inventory", str(inv), timeout=120)
    assert "sudo needs a password for nosudo" in error_line(proc)


@pytest.mark.parametrize(
    "unit",
    [
        "mlflow-server.service",
        "jupyter.service",
        "mlflow-model@e2e.service",
        "demo-wine-warm.service",
    ],
)
def test_killed_services_come_back(stack, trained, unit):
    h = host(stack.info)
    if unit.startswith("mlflow-model@"):
        ok(
            cli(
                stack, "serve", "--run", trained["0.42"], "--name", "e2e", "--port", str(SERVE_PORT)
            )
        )
    pid = sh(h, f"systemctl show -p MainPID --value {unit}").strip()
    assert pid != "0"
    sh(h, f"kill -9 {pid}")

    def restarted():
        new = sh(h, f"systemctl show -p MainPID --value {unit}").strip()
        state = sh(h, f"systemctl is-active {unit} || true").strip()
        return new not in ("0", pid) and state == "active"

    try:
        wait_until(restarted, 10, f"{unit} restarted by systemd")
        wait_until(lambda: "all healthy" in cli(stack, "status").stdout, 120, "all healthy")
    except AssertionError as exc:
        journal = sh(h, f"journalctl -u {unit} -u mlflow-server -n 40 --no-pager -o cat")
        raise AssertionError(f"{exc}\n{journal}") from None
    finally:
        h.close()


def test_public_mlflow_needs_credentials_and_keeps_its_secrets(stack, tmp_path):
    import base64
    import urllib.error

    info = stack.info
    public = stack.with_vars(tmp_path, "mlflow: {public: true}")
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    h = host(info)
    try:
        code, _, proc = provision_json(public)
        assert code == 0, proc.stderr
        assert "0.0.0.0:5000" in sh(h, "ss -Hltn")
        url = f"http://{info.address}:5000{search}"  # from outside, on its network address
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        password = sh(h, "cat /etc/mlflow-stack/secrets/mlflow_admin_password").strip()
        flask_key = sh(h, "cat /etc/mlflow-stack/secrets/mlflow_flask_secret_key").strip()
        auth = base64.b64encode(f"admin:{password}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200
        urls = ok(invoke("urls", "--inventory", str(public)))
        assert f"MLflow   http://{info.address}:5000/" in urls and "user admin" in urls
        for secret in (password, flask_key):
            assert secret not in proc.stdout + proc.stderr + urls
            assert secret not in sh(h, "ps -eo args")
            assert secret not in sh(h, "journalctl --no-pager -q")
        modes = sh(h, "stat -c '%a %U:%G' /etc/mlflow/basic_auth.ini /etc/mlflow/mlflow.env")
        assert modes.split("\n")[:2] == ["640 root:mlflow", "640 root:mlflow"]
    finally:
        code, _, proc = provision_json(stack.inv)  # back to loopback only
        h.close()
    assert code == 0, proc.stderr
    with urllib.request.urlopen(f"{stack.tracking_uri}{search}", timeout=10) as answer:
        assert answer.status == 200
