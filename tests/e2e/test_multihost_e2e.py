"""Tuning across hosts on the private network, as on EC2: the session's server and two workers
on three private addresses. The server's database and MLflow open to the workers alone: its
database on its private address (never all addresses), the tuning account allowed from each
worker's address only and over TLS (the workers pin the server's CA); the workers record
their trial runs through MLflow's REST API on that address.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlflow_stack import layout
from tests.e2e.helpers import ROOT, host, invoke, ok, provision_json, sh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


def inventory_with_workers(stack, workers: list, path: Path) -> Path:
    text = stack.inv.read_text().replace(
        "groups:\n",
        "groups:\n  workers:\n    hosts: [" + ", ".join(w for w, _ in workers) + "]\n",
        1,
    )
    text += "".join(f"  {name}:\n    sandbox: {info.name}\n" for name, info in workers)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory):
    """The stack as the server, two workers and a stranger (a host not in the inventory)."""
    from mlflow_stack import sandbox as sb
    from tests.e2e.conftest import boot

    made = [boot() for _ in range(3)]
    w1, w2, stranger = made
    inv = inventory_with_workers(
        stack, [("w1", w1), ("w2", w2)], tmp_path_factory.mktemp("cluster") / "inventory.yaml"
    )
    try:
        proc = invoke(
            "provision", "--host", "server,workers", "--inventory", str(inv), timeout=1800
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        yield {"inv": inv, "w1": w1, "w2": w2, "stranger": stranger, "provision": proc.stdout}
    finally:
        # back to the stack without workers: loopback only, the workers' accounts dropped
        code, _, out = provision_json(stack.inv)
        for info in made:
            sb.down(info.name)
        assert code == 0, out.stdout[-3000:]
        h = host(stack.info)
        try:
            listening = sh(h, "ss -Hltn 'sport = :3306 or sport = :5000'")
            assert stack.info.address not in listening, listening
            accounts = sh(
                h, "mysql -N -B -e \"SELECT user, host FROM mysql.user WHERE user='optuna'\""
            )
            assert sorted(accounts.split("\n")[:-1]) == ["optuna\t127.0.0.1", "optuna\tlocalhost"]
        finally:
            h.close()


def test_the_server_opens_to_its_workers_on_its_private_address_only(stack, cluster):
    out = cluster["provision"]
    assert "mysql" not in re.findall(r"^(w\d)\s+(\S+)", out, re.M)  # workers: 2 roles only
    h = host(stack.info)
    try:
        address = stack.info.address
        listening = sh(h, "ss -Hltn 'sport = :3306 or sport = :5000'")
        local = sorted(line.split()[3] for line in listening.splitlines())
        assert local == sorted(
            ["127.0.0.1:3306", f"{address}:3306", "127.0.0.1:5000", f"{address}:5000"]
        )
        grants = sh(h, "mysql -N -B -e \"SELECT user, host, ssl_type FROM mysql.user "
                       "WHERE user IN ('optuna', 'mlflow')\"")  # fmt: skip
        rows = sorted(tuple(line.split("\t")) for line in grants.strip().splitlines())
        workers = sorted((cluster["w1"].address, cluster["w2"].address))
        assert rows == sorted(
            [("mlflow", "127.0.0.1", ""), ("mlflow", "localhost", "")]
            + [("optuna", "127.0.0.1", ""), ("optuna", "localhost", "")]
            + [("optuna", w, "ANY") for w in workers]
        )
    finally:
        h.close()


def test_tune_across_the_server_and_two_workers(stack, cluster):
    out = ok(invoke("tune", "--n-trials", "60", "--group", "workers", "--quiet",
                    "--inventory", str(cluster["inv"]), timeout=1800))  # fmt: skip
    match = re.search(r"study (wine-[\d-]+): 60 trials in [\d.]+s\s+\((.*)\)", out)
    assert match, out
    per_host = dict(part.split(": ") for part in match.group(2).split(", "))
    assert set(per_host) == {"e2e", "w1", "w2"} and sum(map(int, per_host.values())) == 60
    assert "trial runs recorded via: e2e#0 service, w1#0 server, w2#0 server" in out
    assert "champion: models:/wine-elasticnet@champion" in out
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=["wine-tuning"], filter_string=f"tags.`optuna.study` = '{match[1]}'"
    )
    trials = runs[runs["tags.optuna.state"].notna()]
    assert len(trials) == 60 and trials["tags.optuna.trial"].nunique() == 60
    assert trials["tags.mlflow.parentRunId"].notna().all()
    assert set(trials["tags.host"]) == {stack.info.name, cluster["w1"].name, cluster["w2"].name}


PROBE = """
import json, sys, pymysql
creds = json.loads(sys.stdin.read())
out = {}
for name, kwargs in creds.items():
    try:
        conn = pymysql.connect(host=kwargs.pop("host"), port=3306, connect_timeout=10, **kwargs)
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            out[name] = sorted(r[0] for r in cur.fetchall())
        conn.close()
    except pymysql.MySQLError as exc:
        out[name] = "refused: " + str(exc.args[0])
print(json.dumps(out))
"""


def test_from_a_worker_only_the_tuning_account_over_tls_gets_in(stack, cluster):
    import json

    server = host(stack.info)
    try:
        tuning = sh(server, f"cat {layout.secret_path('db_tuning_password')}").strip()
        db = sh(server, f"cat {layout.secret_path('db_password')}").strip()
    finally:
        server.close()
    address = stack.info.address
    ca = {"ca": layout.DB_CA_ON_WORKERS}
    creds = {
        "tuning over TLS": {"host": address, "user": "optuna", "password": tuning, "ssl": ca},
        # PyMySQL negotiates TLS by itself when the server offers it: turned off on purpose
        "tuning in plain text": {
            "host": address,
            "user": "optuna",
            "password": tuning,
            "ssl_disabled": True,
        },
        "the tracking account": {"host": address, "user": "mlflow", "password": db, "ssl": ca},
        "root": {"host": address, "user": "root", "password": db, "ssl": ca},
    }
    w1 = host(cluster["w1"])
    try:
        sh(w1, f"test -s {layout.DB_CA_ON_WORKERS}")  # pinned by the tune before
        answer = json.loads(
            sh(w1, "/opt/anaconda/envs/demo/bin/python -c " + shq(PROBE), stdin=json.dumps(creds))
        )
    finally:
        w1.close()
    assert answer["tuning over TLS"] == ["information_schema", "optuna"]
    for refused in ("tuning in plain text", "the tracking account", "root"):
        assert str(answer[refused]).startswith("refused: "), (refused, answer[refused])
    stranger = host(cluster["stranger"])
    try:
        hello = sh(stranger, "python3 -c " + shq(textwrap.dedent(f"""
            import socket
            s = socket.create_connection(({address!r}, 3306), 10)
            print(s.recv(400))
        """)))  # fmt: skip
    finally:
        stranger.close()
    assert "is not allowed to connect" in hello  # a host not in the inventory: refused


def shq(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_a_worker_killed_mid_study_loses_nothing_of_the_others_trials(stack, cluster):
    """Also under load: four trainings on the server while the three hosts tune."""
    inv = str(cluster["inv"])
    tune = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tune", "--n-trials", "240", "--group", "workers",
         "--quiet", "--inventory", inv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    alphas = ("0.11", "0.22", "0.33", "0.44")
    trainings = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "invoke",
                "train",
                "--alpha",
                a,
                "--experiment",
                "e2e-load",
                "--quiet",
                "--inventory",
                inv,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in alphas
    ]
    w2 = host(cluster["w2"])
    try:
        from tests.e2e.helpers import wait_until

        wait_until(lambda: w2.run("pgrep -f 'demo_wine.tune'").ok, 300, "tuning on w2")
        import time

        time.sleep(8)  # some of its trials are done
        sh(w2, "pkill -9 -x demo_wine.tune")  # the run the warm runner forked, by its name
    finally:
        w2.close()
    out, err = tune.communicate(timeout=1800)
    assert tune.returncode == 0, out[-3000:] + err[-2000:]
    assert "warning: w2#0:" in out  # the killed worker, reported
    study = re.search(r"study (wine-[\d-]+):", out)[1]
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=["wine-tuning"], filter_string=f"tags.`optuna.study` = '{study}'"
    )
    trials = runs[runs["tags.optuna.state"].notna()]
    assert trials["tags.optuna.trial"].is_unique  # no trial recorded twice
    h = host(stack.info)
    try:
        done = sh(
            h,
            'mysql -N -B -e "SELECT COUNT(*) FROM optuna.trials t JOIN optuna.studies '
            f"s USING (study_id) WHERE s.study_name='{study}' AND t.state='COMPLETE'\"",
        )
    finally:
        h.close()
    assert len(trials[trials["tags.optuna.state"] == "COMPLETE"]) == int(done)  # all recorded
    for alpha, training in zip(alphas, trainings, strict=True):
        stdout, stderr = training.communicate(timeout=600)
        assert training.returncode == 0, stdout[-1000:] + stderr[-2000:]
        run = mlflow.get_run(re.search(r"^run ([0-9a-f]{32}) ", stdout, re.M).group(1))
        assert run.info.status == "FINISHED" and run.data.params["alpha"] == alpha
