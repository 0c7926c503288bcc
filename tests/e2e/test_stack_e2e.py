"""The whole stack on the session's host: five roles converge, converge again with no change,
every service answers (through the tunnel), secrets stay secret, and one variable change
restarts exactly one unit. Plus check/diff mode on a bare host and the data download option.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pymysql
import pytest

from mlflow_stack import layout
from mlflow_stack.vars import WINE_SHA256
from tests.data import WINE_CSV
from tests.e2e.helpers import (
    changed_steps,
    error_line,
    host,
    inventory,
    invoke,
    ok,
    provision_json,
    secret_forms,
    sh,
)

pytestmark = pytest.mark.e2e


def db_password(h) -> str:
    return sh(h, "cat /etc/mlflow-stack/secrets/db_password").strip()


def test_cold_converge_then_no_change(stack):
    recap = stack.report["recap"]["e2e"]
    assert recap["failed"] == 0 and recap["changed"] > 20
    code, again, proc = provision_json(stack.inv)
    assert code == 0, proc.stderr
    assert changed_steps(again) == [], "changed on the second converge"
    assert again["recap"]["e2e"]["ssh_commands"] == 1  # one probe, read-only


def test_a_no_op_over_paramiko_changes_nothing_either(stack):
    code, again, proc = provision_json(stack.inv, env={"MLFLOW_STACK_SSH": "paramiko"})
    assert code == 0, proc.stderr
    assert changed_steps(again) == [] and again["recap"]["e2e"]["failed"] == 0


def test_check_and_diff_on_a_bare_host_change_nothing_and_hide_secrets(fresh_sandbox, tmp_path):
    bare = fresh_sandbox()
    inv = inventory(tmp_path, bare)
    proc = invoke("provision", "--host", "e2e", "--check", "--diff", "--inventory", str(inv))
    out = ok(proc)
    assert "check mode: nothing was changed" in out and "would change" in out
    assert "failed=0" in out
    assert "(content of /etc/mlflow-stack/secrets/db_password hidden: it holds secrets)" in out
    assert "(content of /etc/mlflow/mlflow.env hidden: it holds secrets)" in out
    assert "+ExecStart=/opt/anaconda/envs/mlflow/bin/python /opt/mlflow/server.py" in out
    h = host(bare)
    try:
        untouched = (
            "for p in /opt/anaconda /opt/mlflow /opt/demo /etc/mlflow /etc/mlflow-stack "
            "/etc/systemd/system/mlflow-server.service /var/lib/mlflow-stack; do "
            '[ -e "$p" ] && echo "exists: $p"; done; '
            "getent passwd mlflow demo; dpkg-query -W -f='${Status}' mariadb-server 2>/dev/null"
            " | grep -q installed && echo 'mariadb installed'; true"
        )
        assert sh(h, untouched).strip() == ""
    finally:
        h.close()


def test_tracking_server_roundtrip_from_the_controller(stack, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    exp = mlflow.set_experiment(f"e2e-{time.time_ns()}")
    (tmp_path / "note.txt").write_text("artifact through the proxy\n")
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        mlflow.log_param("alpha", 0.42)
        mlflow.log_metric("rmse", 0.78)
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    fetched = mlflow.get_run(run.info.run_id)
    assert fetched.data.params["alpha"] == "0.42" and fetched.data.metrics["rmse"] == 0.78
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl")
    )
    assert Path(local).read_text() == "artifact through the proxy\n"
    h = host_of(stack)
    stored = sh(h, f"find {layout.MLFLOW_ARTIFACTS} -name note.txt | head -1").strip()
    assert stored and sh(h, f"stat -c %U {stored}").strip() == "mlflow"


def host_of(stack):
    return host(stack.info)


def test_database_is_utf8mb4_and_user_is_least_privileged(stack):
    h = host_of(stack)
    charset = sh(
        h,
        'mysql -N -B -e "SELECT default_character_set_name, default_collation_name '
        "FROM information_schema.schemata WHERE schema_name='mlflow'\"",
    )
    assert charset.split() == ["utf8mb4", "utf8mb4_bin"]
    tuning = sh(h, "cat /etc/mlflow-stack/secrets/db_tuning_password").strip()
    for user, password, database in (
        ("mlflow", db_password(h), "mlflow"),  # the tracking server's account
        ("optuna", tuning, "optuna"),  # the tuning processes'
    ):
        conn = pymysql.connect(  # through `invoke tunnel --mysql`
            host="127.0.0.1", port=stack.db_port, user=user, password=password
        )
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            assert {r[0] for r in cur.fetchall()} == {"information_schema", database}
            with pytest.raises(pymysql.err.OperationalError):
                cur.execute("CREATE DATABASE e2e_forbidden")
        conn.close()
    assert password != db_password(h)
    anon = sh(h, "mysql -N -B -e \"SELECT COUNT(*) FROM mysql.user WHERE user=''\"")
    assert anon.strip() == "0"
    assert sh(h, "mysql -N -B -e \"SHOW DATABASES LIKE 'test'\"").strip() == ""


def test_secrets_never_leak(stack):
    h = host_of(stack)
    password = db_password(h)
    token = sh(h, "cat /etc/mlflow-stack/secrets/jupyter_token").strip()
    outputs = stack.output
    for secret in (password, token):
        assert len(secret) >= 16
        for form in secret_forms(secret):  # plain, URL-encoded, JSON-escaped
            assert form not in outputs
        assert secret not in sh(h, "ps -eo args")
        assert secret not in sh(h, "journalctl --no-pager -q")
    modes = sh(h, "stat -c '%a %U:%G %n' /etc/mlflow-stack/secrets/*")
    for line in modes.splitlines():
        assert line.startswith("600 root:root "), line
    # the services' own configs: root's, readable by that service's account alone
    modes = sh(h, "stat -c '%a %U:%G' /etc/mlflow/mlflow.env /etc/jupyter-demo/*.json").split("\n")
    assert modes[:2] == ["640 root:mlflow", "640 root:demo"]


def test_jupyter_auth_and_notebook_logs_to_mlflow(stack):
    import urllib.error
    import urllib.request

    h = host_of(stack)
    base = stack.jupyter_url
    token = sh(h, "cat /etc/mlflow-stack/secrets/jupyter_token").strip()
    assert urllib.request.urlopen(f"{base}/api").status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/api/status")
    assert refused.value.code == 403
    req = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
    assert urllib.request.urlopen(req).status == 200
    marker = f"nb-{time.time_ns()}"
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": [
                    "import mlflow\n",
                    f"mlflow.set_experiment('{marker}')\n",
                    "with mlflow.start_run():\n",
                    "    mlflow.log_metric('x', 1.0)\n",
                ],
            }
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    ws = layout.DEMO_WORKSPACE
    sh(h, f"runuser -u demo -- tee {ws}/e2e.ipynb >/dev/null", stdin=json.dumps(notebook))
    sh(
        h,
        f"cd {ws} && runuser -u demo -- env HOME={layout.DEMO_STATE} PYTHONPATH=/opt/demo "
        "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 /opt/anaconda/envs/demo/bin/jupyter "
        "nbconvert --to notebook --execute --inplace e2e.ipynb",
        timeout=300,
    )
    shipped = sh(h, f"ls {ws}/notebooks").split()
    assert "03_model_with_mlflow.ipynb" in shipped  # the shipped notebooks, in the workspace
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    exp = mlflow.get_experiment_by_name(marker)
    assert exp is not None and len(mlflow.search_runs([exp.experiment_id])) == 1


def test_demo_files_and_data(stack):
    h = host_of(stack)
    owners = sh(h, f"stat -c '%U' {layout.DEMO_CODE} {layout.DEMO_DATA}")
    assert set(owners.split()) == {"root"}  # read-only to the demo account
    digest = sh(h, f"sha256sum {layout.DEMO_DATA}").split()[0]
    assert digest == WINE_SHA256
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in sh(h, f"cat {layout.DEMO_SETENV}")
    assert sh(h, "test -f /opt/demo/demo_wine/MLproject && echo yes").strip() == "yes"


def test_the_data_can_be_downloaded_instead(stack, data_server, tmp_path):
    h = host_of(stack)
    sh(h, f"rm {layout.DEMO_DATA}")
    try:
        code, report, proc = provision_json(
            stack.with_vars(tmp_path, f"demo: {{data_url: '{data_server}'}}")
        )
        assert code == 0, proc.stderr
        assert changed_steps(report) == ["demo_files: data (downloaded, sha256 verified)"]
        assert sh(h, f"sha256sum {layout.DEMO_DATA}").split()[0] == WINE_SHA256
    finally:
        code, report, proc = provision_json(stack.inv)  # back to the shipped copy
        h.close()
    assert code == 0 and changed_steps(report) == [], proc.stdout[-2000:]  # the same bytes


def test_corrupt_data_file_fails_clearly_and_keeps_the_old_one(stack, tmp_path):
    bad = tmp_path / "winequality-white.csv"
    bad.write_text("fixed acidity;quality\n1;2\n")
    code, report, proc = provision_json(stack.with_vars(tmp_path, f"demo: {{data_file: '{bad}'}}"))
    assert code != 0
    line = error_line(proc)
    assert "checksum mismatch" in line and str(bad) in line and "demo.data_sha256" in line
    h = host_of(stack)
    try:
        assert sh(h, f"sha256sum {layout.DEMO_DATA}").split()[0] == WINE_SHA256
    finally:
        h.close()
    good = stack.with_vars(tmp_path, f"demo: {{data_file: '{WINE_CSV}'}}")
    code, report, proc = provision_json(good)
    assert code == 0 and changed_steps(report) == []  # same bytes: nothing re-uploaded


def test_changing_workers_restarts_only_mlflow(stack, tmp_path):
    h = host_of(stack)
    pid = sh(h, "systemctl show -p MainPID --value mlflow-server.service").strip()
    jpid = sh(h, "systemctl show -p MainPID --value jupyter.service").strip()
    try:
        code, report, proc = provision_json(stack.with_vars(tmp_path, "mlflow: {workers: 2}"))
        assert code == 0, proc.stderr
        assert changed_steps(report) == [
            "mlflow_server: file /etc/systemd/system/mlflow-server.service",
            "mlflow_server: handler: restart mlflow-server.service",
        ]
        assert sh(h, "systemctl show -p MainPID --value mlflow-server.service").strip() != pid
        assert sh(h, "systemctl show -p MainPID --value jupyter.service").strip() == jpid
        assert "--workers 2" in sh(h, "systemctl cat mlflow-server.service")
        assert "ok (200)" in ok(invoke("status", "--inventory", str(stack.inv)))
    finally:
        code, report, proc = provision_json(stack.inv)  # back to the stack's defaults
        h.close()
    assert code == 0, proc.stderr


SCHEMA_CHECK_DB = "mlflow_schema_check"
BUILD_SCHEMA = """
import sys
import sqlalchemy
from mlflow.store.db.utils import _initialize_tables
uri = next(l.split("=", 1)[1].strip() for l in open(sys.argv[1]) if l.startswith("MLFLOW_BACKEND"))
_initialize_tables(sqlalchemy.create_engine(uri.rsplit("/", 1)[0] + "/" + sys.argv[2]))
"""


def normalized(dump: str) -> list[list[str]]:
    """Each statement's lines, sorted: MLflow creates a table's indexes in no fixed order."""
    return [sorted(line.rstrip(",") for line in stmt.splitlines()) for stmt in dump.split(";\n")]


def test_schema_snapshot_is_the_schema_mlflow_builds(stack):
    """MLflow builds its schema in a scratch database (create_all + every migration); its dump
    must be the shipped snapshot, and the loaded `mlflow` database must have that schema.

    To regenerate the snapshot after changing the pinned MLflow: the same dump of the scratch
    database, without its alembic_version INSERT, under the snapshot's header.
    """
    from roles import mlflow_server

    h = host_of(stack)
    db = SCHEMA_CHECK_DB
    who = ("'mlflow'@'localhost'", "'mlflow'@'127.0.0.1'")
    no_data = "mysqldump --no-data --compact --skip-comments {} | sed 's/ AUTO_INCREMENT=[0-9]*//'"
    try:
        grants = " ".join(f"GRANT ALL ON {db}.* TO {w};" for w in who)
        create = f"CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        sh(h, f'mysql -e "DROP DATABASE IF EXISTS {db}; {create}; {grants}"')
        sh(h, "cat > /tmp/build_schema.py", stdin=BUILD_SCHEMA)
        sh(h, "cd / && runuser -u mlflow -- /opt/anaconda/envs/mlflow/bin/python "
              f"/tmp/build_schema.py /etc/mlflow/mlflow.env {db}", timeout=600)  # fmt: skip
        built = sh(h, f"mysqldump --compact --skip-comments --skip-dump-date {db}")
        built_schema = sh(h, no_data.format(db))
        loaded_schema = sh(h, no_data.format("mlflow"))
    finally:
        h.run(f"mysql -e \"DROP DATABASE IF EXISTS {db}; "
              + " ".join(f"REVOKE ALL ON {db}.* FROM {w};" for w in who) + '"; '
              "rm -f /tmp/build_schema.py")  # fmt: skip
    head = f"INSERT INTO `alembic_version` VALUES\n('{mlflow_server.SCHEMA_HEAD}');\n"
    assert head in built, "MLflow built another schema revision"
    shipped = mlflow_server.SNAPSHOT.read_text()
    body = "".join(line for line in shipped.splitlines(True) if not line.startswith("-- "))
    assert normalized(built.replace(head, "")) == normalized(body), (
        "regenerate templates/mlflow/schema-mariadb.sql"
    )
    assert normalized(loaded_schema) == normalized(built_schema)
