"""Training: metrics on the real data, what the run holds, the CLI's JSON line, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo_wine import artifacts
from demo_wine.errors import InputError
from tests.demo_wine.conftest import run_count, run_module

JSON_KEYS = {"run_id", "experiment_id", "metrics", "model_uri", "params", "elapsed_s", "process"}


def test_train_original_defaults_in_sane_range(store: Path) -> None:
    import mlflow

    from demo_wine.train import train

    result = train(alpha=0.5, l1_ratio=0.5, experiment="wine-test")
    assert set(result) == JSON_KEYS
    m = result["metrics"]
    assert 0.7 < m["rmse"] < 0.9, m  # "usually lands between 0.77 and 0.85"
    assert 0 < m["r2"] < 1
    assert 0.4 < m["mae"] < m["rmse"]

    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["alpha"] == "0.5"
    assert run.data.params["l1_ratio"] == "0.5"
    assert run.data.params["seed"] == "42"
    assert (
        run.data.params["data_sha256"]
        == "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836"
    )
    assert {"rmse", "mae", "r2"} <= set(run.data.metrics)
    assert run.data.tags["host"]
    assert len(run.data.tags["code_version"]) == 12
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"])}
    assert set(artifacts.ALL) <= names

    model = mlflow.pyfunc.load_model(result["model_uri"])
    assert model.metadata.signature is not None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result["model_uri"]))
    reqs = local / "requirements.txt"
    assert "mlflow==" in reqs.read_text()
    from demo_wine.data import FEATURES, load_wine

    sample = load_wine().loc[:4, list(reversed(FEATURES))]  # column order by name via signature
    assert len(model.predict(sample)) == 5
    # The signature (inferred from the first rows) is the one of the whole training split.
    from mlflow.models import infer_signature

    from demo_wine.data import split

    x_train = split(load_wine()).x_train
    fitted = mlflow.sklearn.load_model(result["model_uri"])
    assert model.metadata.signature == infer_signature(x_train, fitted.predict(x_train))


def test_bad_data_creates_no_run(store: Path) -> None:
    from demo_wine.train import train

    bad = store / "bad.csv"
    bad.write_text('"alcohol";"quality"\n9;6\n')
    before = run_count(store / "mlflow.db")
    with pytest.raises(InputError, match="missing column"):
        train(0.5, 0.1, data=str(bad), experiment="wine-test")
    assert run_count(store / "mlflow.db") == before


@pytest.mark.slow
def test_cli_prints_json_last_line(store: Path) -> None:
    proc = run_module(
        "demo_wine.train",
        "--alpha",
        "0.42",
        "--l1-ratio",
        "0.1",
        "--no-artifacts",
        "--experiment",
        "wine-cli",
        cwd=store,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == JSON_KEYS and result["process"] == "cold"
    assert result["params"] == {"alpha": 0.42, "l1_ratio": 0.1, "seed": 42}
    assert result["model_uri"].startswith("models:/")
    assert result["metrics"]["rmse"] < 0.9

    import mlflow

    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"])}
    assert not set(artifacts.ALL) & names  # --no-artifacts: model only
    assert mlflow.get_experiment(result["experiment_id"]).name == "wine-cli"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "-1"], "alpha must be >= 0, got '-1'"),
        (["--l1-ratio", "1.5"], "l1_ratio must be in [0, 1], got '1.5'"),
        (["--alpha", "abc"], "alpha must be a number, got 'abc'"),
        (["--l1-ratio", "nan"], "l1_ratio must be a finite number"),
        (["--seed", "x"], "seed must be an integer"),
        (["--data", "/nonexistent/wine.csv"], "data file not found: /nonexistent/wine.csv"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_input_one_line_exit_2_no_run(
    tmp_path: Path, wine_csv: Path, args: list[str], message: str
) -> None:
    db = tmp_path / "mlflow.db"
    proc = run_module(
        "demo_wine.train",
        *args,
        cwd=tmp_path,
        timeout=60,
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        DEMO_WINE_DATA=str(wine_csv),
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""
    assert run_count(db) == 0


@pytest.mark.parametrize("fork", [True, False])
def test_artifact_job_writes_all_four_or_fails_loudly(
    wine_csv: Path, monkeypatch: pytest.MonkeyPatch, fork: bool
) -> None:
    """The decision artifacts are written in a forked process when this one has a single
    thread, inline otherwise; either way a writer that fails raises in wait()."""
    import threading

    from demo_wine.data import load_wine, split
    from demo_wine.model import fit

    monkeypatch.setattr(threading, "active_count", lambda: 1 if fork else 2)
    parts = split(load_wine(str(wine_csv)))
    model = fit(parts.x_train, parts.y_train, 0.5, 0.1)
    job = artifacts.ArtifactJob(model, parts.x_train, parts.y_train, parts.x_test, parts.y_test)
    try:
        assert job.forked is fork
        out = Path(job.wait())
        assert sorted(p.name for p in out.iterdir()) == sorted(artifacts.ALL)
        assert (out / artifacts.IMPORTANCE_PLOT).read_bytes()[:4] == b"\x89PNG"
    finally:
        job.cleanup()
    assert not out.exists()

    broken = artifacts.ArtifactJob(object(), parts.x_train, parts.y_train, parts.x_test, None)
    try:
        with pytest.raises(RuntimeError, match="writing the decision artifacts failed"):
            broken.wait()
    finally:
        broken.cleanup()
