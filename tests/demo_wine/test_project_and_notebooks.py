"""`mlflow run` of the MLproject and the four notebooks, top to bottom, on local SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from tests.demo_wine.conftest import REPO, child_env

pytestmark = pytest.mark.slow  # MLflow projects and notebooks run end to end

NOTEBOOKS = sorted((REPO / "demo_wine" / "notebooks").glob("*.ipynb"))


def mlflow_run(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mlflow run demo_wine ARGS… --env-manager local` in the store's directory."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return subprocess.run(
        [str(mlflow_bin), "run", str(REPO / "demo_wine"), *args, "--env-manager", "local"],
        cwd=store,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_mlflow_run_main_entry_point(store: Path) -> None:
    proc = mlflow_run(store, "-P", "alpha=0.42", "--experiment-name", "project")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"Run (ID '{result['run_id']}') succeeded" in proc.stderr

    import mlflow

    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["alpha"] == "0.42" and run.data.params["l1_ratio"] == "0.1"
    assert run.data.metrics["rmse"] < 0.9
    assert mlflow.get_experiment(run.info.experiment_id).name == "project"


@pytest.mark.parametrize("n", [1, 2000])
def test_auto_train_is_tune_under_the_original_names(n: int) -> None:
    """The original walkthrough's entry point and parameter run exactly `tune`'s command."""
    from mlflow.projects._project_spec import load_project

    project = load_project(str(REPO / "demo_wine"))
    auto, tune = project.get_entry_point("auto_train"), project.get_entry_point("tune")
    assert list(auto.parameters) == ["n_iter"]
    assert auto.parameters["n_iter"].type == "int"
    assert auto.parameters["n_iter"].default == tune.parameters["n_trials"].default
    assert auto.compute_command({"n_iter": n}, None) == tune.compute_command({"n_trials": n}, None)
    assert f"python -m demo_wine.tune --n-trials {n}" in auto.compute_command({"n_iter": n}, None)
    spec = yaml.safe_load((REPO / "demo_wine" / "MLproject").read_text())
    assert list(spec["entry_points"]) == ["main", "tune", "auto_train"]


def test_mlflow_run_auto_train_entry_point(store: Path) -> None:
    """`mlflow run demo_wine -e auto_train -P n_iter=3`: the tuning run is MLflow's project
    run, with 3 trial runs and the registered best model under it."""
    proc = mlflow_run(store, "-e", "auto_train", "-P", "n_iter=3", "--experiment-name", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trials_done"] == 3 and result["trials_recorded"] == 3
    parent = result["parent_run_id"]
    assert f"Run (ID '{parent}') succeeded" in proc.stderr
    assert result["registered_model"] == "wine-elasticnet" and result["alias_set"] is True

    import mlflow

    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.params["n_iter"] == "3"  # `mlflow run` logs the -P value under its name
    assert run.data.params["n_trials"] == "3"  # and tune its own
    assert run.data.tags["mlflow.project.entryPoint"] == "auto_train"
    assert run.data.metrics["trials_done"] == 3
    assert mlflow.get_experiment(run.info.experiment_id).name == "auto"
    children = mlflow.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}'",
        output_format="list",
    )
    roles = sorted(c.data.tags.get("role", "trial") for c in children)
    assert roles == ["best-model", "trial", "trial", "trial"]
    best = next(c for c in children if c.data.tags.get("role") == "best-model")
    assert best.info.run_id == result["best_run_id"]
    assert best.data.metrics["rmse"] == pytest.approx(result["test_metrics"]["rmse"])


def test_committed_notebooks_have_no_outputs() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_explore_data.ipynb",
        "02_model_without_mlflow.ipynb",
        "03_model_with_mlflow.ipynb",
        "04_explore_models.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def nb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebooks")  # shared: notebook 4 reads notebook 3's runs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(
    path: Path, nb_dir: Path, wine_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    for key, value in child_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{nb_dir}/mlflow.db", DEMO_WINE_DATA=str(wine_csv)
    ).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(nb_dir)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
