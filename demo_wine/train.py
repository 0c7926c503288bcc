"""One tracked ElasticNet training run.

CLI: ``python -m demo_wine.train --alpha 0.42 --l1-ratio 0.1 [--data PATH_OR_URL]
[--experiment wine] [--seed 42] [--no-artifacts]``. The last stdout line is one JSON object:
``run_id``, ``experiment_id``, ``metrics`` (rmse, mae, r2 on the test split), ``model_uri``,
``params``, ``elapsed_s`` and ``process`` ("warm" when forked by :mod:`demo_wine.warm`).
Bad input: one line on stderr, exit code 2, no run created.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from demo_wine.data import DEFAULT_SEED, Split
from demo_wine.errors import Parser, parse_int, run_cli
from demo_wine.model import DEFAULT_ALPHA, DEFAULT_L1_RATIO, validate_params
from demo_wine.warm import MARK_ENV

DEFAULT_EXPERIMENT = "wine"


def fit_and_score(data: Split, alpha: float, l1_ratio: float, *, artifacts: bool) -> Any:
    """Fit on the train part, score on the test part, start writing the decision artifacts
    (see :class:`demo_wine.artifacts.ArtifactJob`); needs no MLflow."""
    from demo_wine.model import fit, scores

    model = fit(data.x_train, data.y_train, alpha, l1_ratio, data.seed)
    metrics = scores(data.y_test, model.predict(data.x_test))
    job = None
    if artifacts:
        from demo_wine.artifacts import ArtifactJob

        job = ArtifactJob(model, data.x_train, data.y_train, data.x_test, data.y_test)
    return model, metrics, job


def log_training(
    data: Split,
    alpha: float,
    l1_ratio: float,
    *,
    artifacts: bool = True,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    skip_params: set[str] | None = None,
    fitted: Any = None,
) -> dict[str, Any]:
    """Fit on the train part, score on the test part and log it all into the active run
    (params named in ``skip_params`` are already logged and left alone). ``fitted``: the
    result of :func:`fit_and_score` when the caller already fitted (before importing MLflow)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from demo_wine.tracking import base_tags, log_model

    model, metrics, job = fitted or fit_and_score(data, alpha, l1_ratio, artifacts=artifacts)
    try:
        all_params = {"alpha": alpha, "l1_ratio": l1_ratio, **data.params(), **(params or {})}
        all_params = {k: v for k, v in all_params.items() if k not in (skip_params or ())}
        all_tags = {**base_tags(), "model_type": "ElasticNet", **(tags or {})}
        run_id = mlflow.active_run().info.run_id
        now = int(time.time() * 1000)
        MlflowClient().log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in all_params.items()],
            tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
        )
        info = log_model(model, data.x_train)
        if job is not None:
            mlflow.log_artifacts(job.wait())
    finally:
        if job is not None:
            job.cleanup()
    return {"run_id": run_id, "metrics": metrics, "model_uri": info.model_uri, "model": model}


def train(
    alpha: Any = DEFAULT_ALPHA,
    l1_ratio: Any = DEFAULT_L1_RATIO,
    data: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    artifacts: bool = True,
    seed: int = DEFAULT_SEED,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Validate, load, split, then run one MLflow run; return the JSON-able result."""
    start = time.perf_counter()
    alpha, l1_ratio = validate_params(alpha, l1_ratio)
    seed = parse_int("seed", seed)
    from demo_wine.data import default_data_path, load_with_digest, split
    from demo_wine.tracking import serialization_format

    serialization_format()  # validate the env before any run exists

    source = data or default_data_path()
    frame, digest = load_with_digest(source)
    parts = split(frame, seed=seed)

    # Fit and start the plots (another process, the other core) before importing MLflow.
    fitted = fit_and_score(parts, alpha, l1_ratio, artifacts=artifacts)
    try:
        import mlflow

        from demo_wine.tracking import configure, experiment_id

        configure()
        # Under `mlflow run` the run (and its experiment) already exist: MLFLOW_RUN_ID.
        where = (
            {} if os.environ.get("MLFLOW_RUN_ID") else {"experiment_id": experiment_id(experiment)}
        )
        with mlflow.start_run(run_name=run_name, **where) as run:
            out = log_training(
                parts,
                alpha,
                l1_ratio,
                artifacts=artifacts,
                params={"data": source, "data_sha256": digest},
                skip_params=set(run.data.params),  # `mlflow run` logged its -P values already
                fitted=fitted,
            )
    finally:
        if fitted[2] is not None:
            fitted[2].cleanup()
    return {
        "run_id": out["run_id"],
        "experiment_id": run.info.experiment_id,
        "metrics": out["metrics"],
        "model_uri": out["model_uri"],
        "params": {"alpha": alpha, "l1_ratio": l1_ratio, "seed": seed},
        "elapsed_s": round(time.perf_counter() - start, 3),
        "process": os.environ.get(MARK_ENV, "cold"),  # "warm": forked by demo_wine.warm
    }


def _parser() -> Parser:
    p = Parser(prog="python -m demo_wine.train", description="One tracked ElasticNet run.")
    p.add_argument("--alpha", default=str(DEFAULT_ALPHA), help="regularisation strength (>= 0)")
    p.add_argument("--l1-ratio", default=str(DEFAULT_L1_RATIO), help="L1 share in [0, 1]")
    p.add_argument(
        "--data",
        default=None,
        help="CSV path or http(s) URL (default: $DEMO_WINE_DATA "
        "or <package>/../data/winequality-white.csv)",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--seed", default=str(DEFAULT_SEED), help="train/test split seed")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    p.add_argument("--no-artifacts", action="store_true", help="skip the plots and tables")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    validate_params(args.alpha, args.l1_ratio)  # fail before importing anything heavy
    result = train(
        args.alpha,
        args.l1_ratio,
        args.data or None,
        args.experiment,
        artifacts=not args.no_artifacts,
        seed=args.seed,
        run_name=args.run_name,
    )
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
