"""Tuning: child run per trial, validation-only objective, registry alias, shared studies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from demo_wine import CHAMPION_ALIAS, MODEL_NAME
from tests.demo_wine.conftest import child_env, run_count, run_module

TUNE_KEYS = {
    "study",
    "storage",
    "trials_done",
    "trials_recorded",
    "storage_outages",
    "trials_cut_off",
    "trials_recovered",
    "recorded_via",
    "trials_total",
    "best_trial",
    "best_params",
    "best_value",
    "objective",
    "best_trial_run_id",
    "best_run_id",
    "test_metrics",
    "model_uri",
    "registered_model",
    "registered_version",
    "alias_set",
    "parent_run_id",
    "experiment_id",
    "optimize_s",
    "trials_per_s",
    "elapsed_s",
}


def children(experiment_id: str, parent: str | None = None) -> list:
    from mlflow import MlflowClient

    query = "tags.`optuna.trial` != ''"
    if parent:
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = MlflowClient().search_runs([experiment_id], query, max_results=1000)
    return [r for r in runs if r.data.tags.get("role") != "best-model"]


def test_tune_records_every_trial_and_registers_champion(store: Path) -> None:
    from mlflow import MlflowClient

    from demo_wine.tune import tune

    result = tune(n_trials=24, experiment="tune-test", study_name="t1")
    assert set(result) == TUNE_KEYS
    assert result["trials_done"] == result["trials_recorded"] == result["trials_total"] == 24
    assert result["storage"] == "in-memory"
    assert result["recorded_via"] == "database"  # the local store is the database
    assert set(result["best_params"]) == {"alpha", "l1_ratio"}

    runs = children(result["experiment_id"], result["parent_run_id"])
    assert len(runs) == 24
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in runs)
    assert numbers == list(range(24))
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"alpha", "l1_ratio"} <= set(r.data.params)
        assert {"val_rmse", "val_mae", "val_r2"} == set(r.data.metrics)
        assert r.data.tags["host"] and r.data.tags["pid"] == str(os.getpid())
    # The objective is the validation RMSE; the held-out test split only scores the final model.
    assert result["best_value"] == pytest.approx(min(r.data.metrics["val_rmse"] for r in runs))
    assert result["objective"] == "val_rmse"
    assert result["test_metrics"]["rmse"] < 0.9 and result["test_metrics"]["r2"] > 0

    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["validation"] == "holdout 0.2 of train"
    assert parent.info.status == "FINISHED"
    best = client.get_run(result["best_run_id"])
    assert best.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    assert {"feature_importance.png", "predicted_vs_actual.png"} <= {
        a.path for a in client.list_artifacts(result["best_run_id"])
    }
    version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    assert str(version.version) == result["registered_version"]
    assert version.run_id == result["best_run_id"]
    assert result["alias_set"] is True


def test_threads_record_every_trial_without_registering(store: Path) -> None:
    from demo_wine.tune import tune

    result = tune(n_trials=10, jobs=2, register=False, experiment="threads", study_name="t2")
    assert result["trials_recorded"] == 10 and result["registered_version"] is None
    runs = children(result["experiment_id"], result["parent_run_id"])
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(10))


def test_a_database_that_is_not_the_tracking_store_is_refused(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DEMO_WINE_MLFLOW_DB pointing elsewhere (no MLflow schema, or not holding our parent
    run): trial runs go through the tracking client instead, none is lost."""
    from demo_wine.tune import tune

    other = store / "other.db"
    monkeypatch.setenv("DEMO_WINE_MLFLOW_DB", f"sqlite:///{other}")
    result = tune(n_trials=6, register=False, experiment="fallback", study_name="fb")
    assert result["recorded_via"] == "server"
    assert "not writing trial runs to" in capsys.readouterr().err
    runs = children(result["experiment_id"], result["parent_run_id"])
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(6))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-trials", "-3"], "n_trials must be >= 0"),
        (["--jobs", "0"], "jobs must be >= 1"),
        (["--storage", "nosuchdialect://x/y"], "cannot open Optuna storage"),
        (["--sampler", "grid"], "invalid choice: 'grid'"),
        (["--n-trials", "0"], "needs --storage"),
    ],
)
def test_cli_bad_input(tmp_path: Path, wine_csv: Path, args: list[str], message: str) -> None:
    db = tmp_path / "mlflow.db"
    proc = run_module(
        "demo_wine.tune",
        *args,
        cwd=tmp_path,
        timeout=120,
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        DEMO_WINE_DATA=str(wine_csv),
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert run_count(db) == 0


def test_storage_must_not_be_the_mlflow_db(store: Path) -> None:
    from demo_wine.errors import InputError
    from demo_wine.tune import tune

    with pytest.raises(InputError, match="must not be the MLflow database"):
        tune(5, storage=os.environ["MLFLOW_TRACKING_URI"])


@pytest.mark.slow
def test_two_processes_share_a_study_then_finalise(store: Path) -> None:
    """Optuna's distributed mode over a shared RDB storage (SQLite here; set
    DEMO_WINE_TEST_OPTUNA_STORAGE to a mysql+pymysql:// URL to run it against MySQL)."""
    storage = os.environ.get("DEMO_WINE_TEST_OPTUNA_STORAGE") or f"sqlite:///{store}/optuna.db"
    study = f"shared-{os.getpid()}"
    from mlflow import MlflowClient

    MlflowClient().search_experiments()  # the MLflow schema exists before workers start
    cmd = [
        sys.executable,
        "-m",
        "demo_wine.tune",
        "--n-trials",
        "12",
        "--storage",
        storage,
        "--study",
        study,
        "--experiment",
        "shared",
        "--no-register",
        "--sampler",
        "random",
    ]
    env = child_env()
    procs = [
        subprocess.Popen(
            cmd, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["trials_done"] == r["trials_recorded"] == 12 for r in results)
    assert all(r["registered_version"] is None for r in results)

    import optuna

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == 24

    exp_id = results[0]["experiment_id"]
    runs = children(exp_id)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == sorted(numbers)
    for r in results:
        mine = children(exp_id, r["parent_run_id"])
        assert len(mine) == 12
        assert len({c.data.tags["pid"] for c in mine}) == 1
    assert len({c.data.tags["pid"] for c in runs}) == 2

    # A coordinator finalises: no new trials, retrain + register the study's best.
    from demo_wine.tune import tune

    final = tune(0, storage=storage, study_name=study, experiment="shared")
    assert final["trials_done"] == 0 and final["trials_total"] == 24
    assert final["best_value"] == pytest.approx(min(t.value for t in trials))
    assert final["registered_version"] and final["alias_set"] is True


def test_finalising_records_trials_a_dead_worker_left_without_a_run(store: Path) -> None:
    """Trials finished in the shared study whose worker died before recording them get
    their run at finalisation (metrics recomputed, equal to the trial's value), once."""
    import optuna

    from demo_wine.data import load_wine, split, validation_split
    from demo_wine.model import ALPHA_RANGE, L1_RATIO_RANGE, fit, scores
    from demo_wine.tune import tune

    storage = f"sqlite:///{store}/optuna.db"
    first = tune(4, storage=storage, study_name="dead", register=False, experiment="dead")
    assert first["trials_recorded"] == 4 and first["trials_recovered"] == 0

    inner = validation_split(split(load_wine()))

    def dead_worker(trial: optuna.Trial) -> float:  # finishes trials, records nothing
        a = trial.suggest_float("alpha", *ALPHA_RANGE, log=True)
        r = trial.suggest_float("l1_ratio", *L1_RATIO_RANGE)
        model = fit(inner.x_train.to_numpy(), inner.y_train.to_numpy(), a, r)
        return scores(inner.y_test.to_numpy(), model.predict(inner.x_test.to_numpy()))["rmse"]

    study = optuna.load_study(study_name="dead", storage=storage)
    study.optimize(dead_worker, n_trials=3)

    final = tune(0, storage=storage, study_name="dead", experiment="dead")
    assert final["trials_done"] == 0 and final["trials_recovered"] == 3
    assert final["trials_recorded"] == 3 and final["trials_total"] == 7
    runs = children(final["experiment_id"])
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(7))
    values = {t.number: t.value for t in study.get_trials()}
    for r in children(final["experiment_id"], final["parent_run_id"]):
        number = int(r.data.tags["optuna.trial"])
        assert number >= 4
        assert r.data.metrics["val_rmse"] == pytest.approx(values[number], rel=1e-9)
        assert {"val_mae", "val_r2"} <= set(r.data.metrics)

    again = tune(0, storage=storage, study_name="dead", experiment="dead", register=False)
    assert again["trials_recovered"] == 0
    assert len(children(final["experiment_id"])) == 7


@pytest.mark.parametrize(
    "lost_race",
    [
        # MySQL 9.7, two processes creating Optuna's schema at once (seen on Debian sid)
        "(pymysql.err.OperationalError) (1684, \"Table 'optuna'.'trials' was skipped since "
        'its definition is being modified by concurrent DDL statement")',
        "(pymysql.err.OperationalError) (1050, \"Table 'studies' already exists\")",
    ],
)
def test_a_lost_schema_race_is_retried(monkeypatch, lost_race: str) -> None:
    import optuna
    import sqlalchemy.exc

    from demo_wine import tune

    calls, real = [], optuna.create_study

    def create_study(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE …", {}, Exception(lost_race))
        return real(direction="minimize")

    monkeypatch.setattr(optuna, "create_study", create_study)
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    study = tune._open_study("s", "mysql+pymysql://optuna:pw@127.0.0.1:9/optuna", None)
    assert len(calls) == 3 and study.direction.name == "MINIMIZE"


def test_an_unreachable_storage_is_not_retried(monkeypatch) -> None:
    import optuna
    import sqlalchemy.exc

    from demo_wine import tune
    from demo_wine.errors import InputError

    calls = []

    def create_study(**kwargs):
        calls.append(kwargs)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception('(2003, "Can\'t connect")'))

    monkeypatch.setattr(optuna, "create_study", create_study)
    with pytest.raises(
        InputError,
        match=re.escape("cannot open Optuna storage mysql+pymysql://optuna:***@127.0.0.1:9/"),
    ):
        tune._open_study("s", "mysql+pymysql://optuna:pw@127.0.0.1:9/optuna", None)
    assert len(calls) == 1
