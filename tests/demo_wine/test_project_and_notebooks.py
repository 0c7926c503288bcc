"""`mlflow run` of the MLproject and the four notebooks, top to bottom, on local SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.demo_wine.conftest import REPO, child_env

pytestmark = pytest.mark.slow  # MLflow projects and notebooks run end to end

NOTEBOOKS = sorted((REPO / "demo_wine" / "notebooks").glob("*.ipynb"))


def test_mlflow_run_main_entry_point(store: Path) -> None:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.run(
        [
            str(mlflow_bin),
            "run",
            str(REPO / "demo_wine"),
            "-P",
            "alpha=0.42",
            "--env-manager",
            "local",
            "--experiment-name",
            "project",
        ],
        cwd=store,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"Run (ID '{result['run_id']}') succeeded" in proc.stderr

    import mlflow

    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["alpha"] == "0.42" and run.data.params["l1_ratio"] == "0.1"
    assert run.data.metrics["rmse"] < 0.9
    assert mlflow.get_experiment(run.info.experiment_id).name == "project"


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
