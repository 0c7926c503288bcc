"""Fixtures for demo_wine: the real CSV, an isolated SQLite MLflow store, subprocess envs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def wine_csv() -> Path:
    """The copy shipped with demo_wine (its checksum is checked by test_data)."""
    from demo_wine.data import BUNDLED

    return BUNDLED


@pytest.fixture
def store(tmp_path: Path, wine_csv: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` with MLflow on ``sqlite:///<tmp>/mlflow.db`` and the real data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DEMO_WINE_DATA", str(wine_csv))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def child_env(**extra: str) -> dict[str, str]:
    """Env for child processes: repo on PYTHONPATH, venv first on PATH, bytecode cached in
    the temp dir (cold compiles of mlflow otherwise cost ~10 s per process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "demo-wine-pyc"))
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.update(extra)
    return env


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_count(db: Path) -> int:
    """Number of MLflow runs in a SQLite store (0 when the file does not exist)."""
    if not db.exists():
        return 0
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.fixture
def tracking(tmp_path: Path) -> tuple:
    """A fresh SQLite tracking store with one experiment and an active parent run."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.create_experiment("rec", artifact_location="mlflow-artifacts:/rec")
    parent = client.create_run(exp, tags={"role": "tuning"}).info.run_id
    return uri, db, client, exp, parent
