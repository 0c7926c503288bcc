"""The original demo's walkthrough, command by command, as the host's README prints it.

The commands are read from `/opt/demo/README` on the provisioned stack (the project's README
prints the same block: compared first) and run as printed, step by step in the original's
order, as the host's `demo` user: without a login shell and with nothing writable in
/opt/demo (HOME and the working directory are a scratch directory of its own), each step a
shell of its own that gets the variables (`exp`, `run`, `server`) the earlier steps set. The
changes: one scratch directory for all steps instead of a `mktemp -d` each, a unique
experiment name, and `n_iter=20` instead of the original's 2000. The database step runs as
the login user, with its sudo. Every step's output is checked, and
what it did is checked again from outside (MLflow's API through the tunnel, the UI's search
endpoint, the host's processes and ports, the tables the installed MLflow declares).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest

from mlflow_stack import layout
from mlflow_stack.actions.check_mysql import EXPECTED_SCRIPT
from mlflow_stack.actions.predict import SAMPLE_WINE, dataframe_split
from mlflow_stack.layout import Layout
from tests.e2e.helpers import ROOT, host, sh, wait_until

pytestmark = pytest.mark.e2e

SETENV = "/opt/demo/setenv.sh"
PREAMBLE = [f". {SETENV}", 'cd "$(mktemp -d)"']
STEP = re.compile(r"# (\d+)\. .+")
PORT = 54321  # the original's
N_ITER = 20  # the original's 2000 takes ≈ 3 min
RUN_ID = re.compile(r"[0-9a-f]{32}")
MLFLOW_PYTHON = Layout().python(layout.MLFLOW_ENV)  # the tracking server's env
MODEL = "wine-elasticnet"  # the name tuning registers its best model under


def walkthrough_block(lines: list[str], indent: str) -> list[str]:
    """The walkthrough's lines (without `indent`): from the line sourcing setenv.sh to the
    end of the block (a blank line, or the fence closing it)."""
    start = lines.index(f"{indent}{PREAMBLE[0]}")
    block = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("```"):
            break
        assert line.startswith(indent), line
        block.append(line[len(indent) :])
    return block


def steps_of(block: list[str]) -> tuple[list[str], dict[int, str]]:
    """The preamble's lines and the numbered steps' scripts (each under its `# N. …` line)."""
    preamble: list[str] = []
    steps: dict[int, list[str]] = {}
    current = None
    for line in block:
        if m := STEP.fullmatch(line):
            current = int(m[1])
            steps[current] = []
        elif current is None:
            preamble.append(line)
        else:
            steps[current].append(line)
    return preamble, {n: "\n".join(lines) for n, lines in steps.items()}


def host_walkthrough(h) -> tuple[list[str], dict[int, str]]:
    readme = sh(h, "cat /opt/demo/README").splitlines()
    return steps_of(walkthrough_block(readme, "  "))


@dataclass
class Walk:
    """The walkthrough in progress on the stack: the demo user's scratch, the steps."""

    h: object
    steps: dict[int, str]
    scratch: str
    experiment: str
    passed: set[int] = field(default_factory=set)
    shell: dict[str, str] = field(default_factory=dict)  # the variables the steps set
    runs: dict[str, str] = field(default_factory=dict)  # the runs the steps made

    def script(self, n: int) -> str:
        text = self.steps[n]
        if n == 1:
            assert text.count("walkthrough") == 2, text
            text = text.replace("walkthrough", self.experiment)
        if n == 3:
            assert text.count("-P n_iter=2000 ") == 1, text
            text = text.replace("-P n_iter=2000 ", f"-P n_iter={N_ITER} ")
        return text

    def require(self, *steps: int) -> None:
        missing = [n for n in steps if n not in self.passed]
        if missing:
            pytest.skip(f"step(s) {missing} did not pass")

    def as_demo(self, n: int, timeout: float = 600) -> str:
        """Run step `n` as printed, as user demo, in a shell of its own (the preamble's
        setenv.sh, the scratch directory, the variables earlier steps set); its stdout and
        stderr together. A failing command fails the step (set -e, pipefail)."""
        s = self.scratch
        inner = (
            "set -eo pipefail\n"
            f"{PREAMBLE[0]}\n"
            f"cd {s}/work\n"
            f". {s}/vars\n"
            f"{self.script(n)}\n"
            f"{{ declare -p exp run server 2>/dev/null || true; }} > {s}/vars\n"
        )
        command = (
            f"cd {s}/work && setsid -w runuser -u demo -- env HOME={s} "
            f"bash -c {shlex.quote(inner)} < /dev/null 2>&1"
        )
        result = self.h.run(command, timeout=timeout)
        assert result.ok, f"step {n} failed ({result.rc}):\n{result.stdout[-4000:]}"
        text = sh(self.h, f"cat {s}/vars")
        self.shell = dict(re.findall(r'^declare -- (\w+)="([^"]*)"$', text, re.M))
        return result.stdout

    def as_demo_check(self, command: str) -> str:
        """A command of the test's own (not a step) as user demo, with setenv.sh."""
        s = self.scratch
        inner = f". {SETENV} && cd {s}/work && {command}"
        return sh(self.h, f"runuser -u demo -- env HOME={s} bash -c {shlex.quote(inner)}")


@pytest.fixture(scope="module")
def walk(stack):
    h = host(stack.info)
    _, steps = host_walkthrough(h)
    scratch = f"/var/tmp/walkthrough-{uuid.uuid4().hex[:8]}"
    sh(
        h,
        f"install -d -o demo -g demo -m 0700 {scratch} {scratch}/work && "
        f"install -o demo -g demo -m 0600 /dev/null {scratch}/vars",
    )
    from mlflow.exceptions import MlflowException

    client = mlflow_client(stack)
    try:
        champion = client.get_model_version_by_alias(MODEL, "champion").version
    except MlflowException:  # no registered model or alias yet
        champion = None
    w = Walk(h, steps, scratch, f"walkthrough-{uuid.uuid4().hex[:8]}")
    try:
        yield w
    finally:
        # A model server the walkthrough left running (step 8 failed): its process group.
        server = w.shell.get("server")
        if server:
            h.run(f'pg=$(ps -o pgid= -p {server} | tr -d " ") && [ -n "$pg" ] && kill -- -"$pg"')
        # The walkthrough's tuning moved the champion alias (or made it): put it back.
        if champion is not None:
            client.set_registered_model_alias(MODEL, "champion", champion)
        elif 3 in w.passed:
            client.delete_registered_model_alias(MODEL, "champion")
        h.run(f"rm -rf {scratch}")
        h.close()


def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.tracking_uri)


def run_of(output: str) -> str:
    """The run id `mlflow run` reports as succeeded."""
    m = re.search(r"=== Run \(ID '([0-9a-f]{32})'\) succeeded ===", output)
    assert m, output[-3000:]
    return m[1]


def last_json(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    return json.loads(lines[-1])


def test_both_readmes_print_the_walkthrough_the_issue_asks_for(stack):
    h = host(stack.info)
    try:
        preamble, steps = host_walkthrough(h)
        block = walkthrough_block(sh(h, "cat /opt/demo/README").splitlines(), "  ")
    finally:
        h.close()
    # The project's README prints the same block, as the stack's defaults render it.
    readme = (ROOT / "README.md").read_text().splitlines()
    assert walkthrough_block(readme, "") == block
    assert preamble == PREAMBLE
    assert sorted(steps) == list(range(1, 10))
    assert "mlflow experiments create --experiment-name walkthrough" in steps[1]
    assert '-P alpha=0.42 --env-manager uv --experiment-id "$exp"' in steps[2]
    assert '-e auto_train -P n_iter=2000 --env-manager uv --experiment-id "$exp"' in steps[3]
    assert "'metrics.rmse < 0.8'" in steps[4]
    assert "mlflow models serve -m runs:/$run/model -p 54321 --env-manager local" in steps[5]
    assert "format=pandas-split" in steps[7]
    assert steps[8] == "pkill -P $server; kill $server"  # uvicorn too: it outlives its parent
    assert steps[9] == "sudo mysql -e 'use mlflow; show tables;'"
    # The original's sample wine, in MLflow 2+'s form and in the original's.
    bodies = {
        n: json.loads(re.search(r"-d '(.*?)'", steps[n].replace("\\\n", ""), re.S)[1])
        for n in (6, 7)
    }
    assert bodies[6] == dataframe_split([SAMPLE_WINE])
    assert bodies[7] == dataframe_split([SAMPLE_WINE])["dataframe_split"]


def test_step_1_create_an_experiment(stack, walk):
    out = walk.as_demo(1)
    m = re.search(rf"^Created experiment '{walk.experiment}' with id (\d+)$", out, re.M)
    assert m, out
    assert walk.shell["exp"] == m[1]
    exp = mlflow_client(stack).get_experiment(m[1])
    assert exp.name == walk.experiment and exp.lifecycle_stage == "active"
    walk.passed.add(1)


def test_step_2_mlflow_run_alpha_042_in_an_env_uv_builds(stack, walk):
    walk.require(1)
    out = walk.as_demo(2, timeout=600)
    run_id = run_of(out)
    home = walk.scratch
    # uv made the project's env (python_env.yaml) in the demo user's own MLflow env root
    # and ran the entry point in it.
    env = re.search(rf"source ({home}/\.mlflow/envs/mlflow-[0-9a-f]+)/bin/activate && ", out)
    assert env, out[-3000:]
    assert "python -m demo_wine.train --alpha 0.42 --l1-ratio 0.1" in out
    versions = sh(
        walk.h,
        f"{env[1]}/bin/python -c 'import sys, mlflow, sklearn; "
        "print(sys.version_info[:2], mlflow.__version__, sklearn.__version__)'",
    )
    assert versions.startswith("(3, 11) 3.17.2 "), versions
    result = last_json(out)
    assert result["run_id"] == run_id and result["experiment_id"] == walk.shell["exp"]
    assert 0.7 < result["metrics"]["rmse"] < 0.8
    run = mlflow_client(stack).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == walk.shell["exp"]
    assert run.data.params["alpha"] == "0.42"
    assert run.data.tags["mlflow.project.env"] == "uv"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert run.data.tags["mlflow.user"] == "demo"
    assert run.data.metrics["rmse"] == pytest.approx(result["metrics"]["rmse"])
    walk.runs["alpha"] = run_id
    walk.passed.add(2)


def test_step_3_the_auto_train_entry_point(stack, walk):
    walk.require(1, 2)
    out = walk.as_demo(3, timeout=600)
    parent = run_of(out)
    assert f"python -m demo_wine.tune --n-trials {N_ITER}" in out
    assert "already exists" in out  # the env step 2 built, reused
    result = last_json(out)
    assert result["parent_run_id"] == parent and result["experiment_id"] == walk.shell["exp"]
    assert result["trials_done"] == N_ITER and result["trials_recorded"] == N_ITER
    assert result["registered_model"] == MODEL and result["alias_set"] is True
    client = mlflow_client(stack)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "auto_train"
    assert run.data.params["n_iter"] == str(N_ITER) == run.data.params["n_trials"]
    children = client.search_runs(
        [walk.shell["exp"]], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000
    )
    roles = [c.data.tags.get("role", "trial") for c in children]
    assert roles.count("trial") == N_ITER and roles.count("best-model") == 1
    best = next(c for c in children if c.data.tags.get("role") == "best-model")
    assert best.info.run_id == result["best_run_id"]
    assert best.data.metrics["rmse"] == pytest.approx(result["test_metrics"]["rmse"])
    walk.runs["best"] = best.info.run_id
    walk.passed.add(3)


def test_step_4_search_metrics_rmse_under_08(stack, walk):
    walk.require(1, 2, 3)
    exp = walk.shell["exp"]
    wanted = {walk.runs["alpha"], walk.runs["best"]}
    out = walk.as_demo(4)
    rows = [line.split() for line in out.splitlines() if RUN_ID.match(line)]
    assert {r[0] for r in rows} == wanted, out
    rmse = [float(r[-1]) for r in rows]
    assert rmse == sorted(rmse) and all(v < 0.8 for v in rmse)
    assert walk.shell["run"] == rows[0][0]  # the best one
    # The same through MLflow's client, and through the endpoint the UI's search box calls.
    client = mlflow_client(stack)
    found = client.search_runs([exp], "metrics.rmse < 0.8")
    assert {r.info.run_id for r in found} == wanted
    request = urllib.request.Request(
        f"{stack.tracking_uri}/ajax-api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": [exp], "filter": "metrics.rmse < 0.8"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        ui = json.load(answer)
    assert {r["info"]["run_id"] for r in ui["runs"]} == wanted
    # `mlflow runs list` (no filter) lists them among the experiment's runs.
    listed = walk.as_demo_check(f"mlflow runs list --experiment-id {exp}")
    ids = set(RUN_ID.findall(listed))
    assert wanted <= ids and len(ids) == N_ITER + 3  # main, tuning parent, best model, trials
    walk.passed.add(4)


def test_step_5_serve_the_run_by_the_originals_command(stack, walk):
    walk.require(4)
    run = walk.shell["run"]
    free = walk.h.run(f"curl -s -o /dev/null http://127.0.0.1:{PORT}/ping")
    assert free.rc == 7, f"something already listens on port {PORT} of the host"
    out = walk.as_demo(5, timeout=180)
    assert out.strip() == ""  # /ping answers an empty line
    server = walk.shell["server"]
    owner, args = sh(walk.h, f"ps -o user=,args= -p {server}").split(None, 1)
    assert owner == "demo"
    assert f"mlflow models serve -m runs:/{run}/model -p {PORT} --env-manager local" in args
    listener = sh(walk.h, f"ps -o user=,args= --ppid {server}")
    assert "uvicorn --host 127.0.0.1 --port 54321" in listener and listener.startswith("demo ")
    log = sh(walk.h, f"cat {walk.scratch}/work/serve.log")
    assert f"Uvicorn running on http://127.0.0.1:{PORT}" in log
    walk.passed.add(5)


def test_step_6_score_the_sample_wine(walk):
    walk.require(5)
    out = walk.as_demo(6)
    predictions = json.loads(out)["predictions"]
    assert len(predictions) == 1 and math.isfinite(predictions[0])
    # What the model itself says, loaded by its run in the demo env (the JSON's integers are
    # doubles to the server, as the signature says).
    wine = {k: float(v) for k, v in SAMPLE_WINE.items()}
    code = (
        "import json, mlflow.pyfunc, pandas as pd; "
        f"m = mlflow.pyfunc.load_model('runs:/{walk.shell['run']}/model'); "
        f"print(json.dumps(list(m.predict(pd.DataFrame([{wine!r}])))))"
    )
    expected = walk.as_demo_check(f"python -c {shlex.quote(code)}")
    assert predictions == pytest.approx(json.loads(expected.strip().splitlines()[-1]))
    assert 3 < predictions[0] < 9
    walk.passed.add(6)


def test_step_7_the_originals_content_type_gets_415(walk):
    walk.require(5)
    out = walk.as_demo(7)
    body, _, status = out.strip().rpartition("\n")
    assert status == "HTTP 415"
    assert "Unrecognized content type parameters: format" in body
    assert "scoring protocol has changed in MLflow version 2.0" in body
    walk.passed.add(7)


def test_step_8_stop_the_model_server(walk):
    walk.require(5)
    server = walk.shell["server"]
    out = walk.as_demo(8)
    assert out.strip() == ""
    wait_until(
        lambda: walk.h.run(f"kill -0 {server}").rc != 0,
        30,
        "the model server stopping",
    )
    # uvicorn (the server's child) shuts down gracefully: nothing listens, nothing is left
    wait_until(
        lambda: walk.h.run(f"curl -s -o /dev/null http://127.0.0.1:{PORT}/ping").rc == 7,
        30,
        "nothing listening on the model server's port",
    )
    wait_until(
        lambda: sh(walk.h, f"pgrep -u demo -f 'port {PORT}' || true").strip() == "",
        30,
        "uvicorn exiting with the model server",
    )
    walk.shell.pop("server", None)  # nothing left for the fixture to stop
    walk.passed.add(8)


def test_step_9_show_tables_lists_what_the_installed_mlflow_declares(walk):
    result = walk.h.run(walk.steps[9], sudo=False)  # as the login user, with its sudo
    assert result.ok, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "Tables_in_mlflow"
    expected = json.loads(
        sh(walk.h, f'cd / && {MLFLOW_PYTHON} -c "{EXPECTED_SCRIPT}"').strip().splitlines()[-1]
    )
    assert sorted(lines[1:]) == sorted([*expected["tables"], "alembic_version"])
    assert {"experiments", "runs", "metrics", "registered_models"} <= set(lines[1:])
