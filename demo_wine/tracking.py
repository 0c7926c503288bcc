"""MLflow plumbing shared by train and tune: tracking URI, tags, experiments, model logging."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = {".py", ".yaml", ".txt", ""}
_BASE_REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "pandas", "scipy")
SERIALIZATION_ENV = "DEMO_WINE_SERIALIZATION"
# cloudpickle by default: skops (MLflow's default) adds ~3 s per log_model (import + type scan)
# against a 5 s budget. Models here come only from our own runs; set
# DEMO_WINE_SERIALIZATION=skops for the safe-loading format.
DEFAULT_SERIALIZATION = "cloudpickle"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded default, a SQLite file in the working dir."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_TRACKING_URI


def configure() -> str:
    """Point MLflow at :func:`tracking_uri` (registry included) and return it."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@functools.cache
def code_version() -> str:
    """Git-free code version: sha256 (12 hex) over the package's source files and names."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*")):
        rel = path.relative_to(PACKAGE_DIR)
        if (
            not path.is_file()
            or path.suffix not in _SOURCE_SUFFIXES
            or "__pycache__" in rel.parts
            or rel.parts[0] == "notebooks"
        ):
            continue
        digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def base_tags() -> dict[str, str]:
    """Tags every run carries: host, process and code version."""
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "code_version": code_version(),
    }


def experiment_id(name: str) -> str:
    """Id of experiment ``name``, created if needed (tolerates a concurrent creator)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for _ in range(3):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:
            continue  # another process created it meanwhile
    raise RuntimeError(f"cannot get or create experiment {name!r}")


def serialization_format() -> str:
    value = os.environ.get(SERIALIZATION_ENV, "").strip() or DEFAULT_SERIALIZATION
    if value not in ("cloudpickle", "pickle", "skops"):
        from demo_wine.errors import InputError

        raise InputError(f"{SERIALIZATION_ENV} must be cloudpickle, pickle or skops, got {value!r}")
    return value


@functools.cache
def pip_requirements(serialization: str = DEFAULT_SERIALIZATION) -> list[str]:
    """Pinned requirements of the logged model (explicit: inference costs seconds)."""
    reqs = []
    extra = {"cloudpickle": ("cloudpickle",), "skops": ("skops",)}.get(serialization, ())
    for name in (*_BASE_REQUIREMENTS, *extra):
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name == "mlflow":
                reqs.append(f"mlflow-skinny=={metadata.version('mlflow-skinny')}")
    return reqs


SIGNATURE_ROWS = 100


def log_model(model: Any, x_example: Any) -> Any:
    """Log ``model`` as ``model`` in the active run with signature and input example.

    The signature is inferred from the first rows only (MLflow checks every value for
    missing ones, ~0.3 s on the whole split; the data has none, so the schema is the same;
    a test compares)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    fmt = serialization_format()
    head = x_example.head(SIGNATURE_ROWS)
    signature = infer_signature(head, model.predict(head))
    return mlflow.sklearn.log_model(
        model,
        name="model",
        signature=signature,
        input_example=x_example.head(5),
        pip_requirements=pip_requirements(fmt),
        serialization_format=fmt,
    )
