"""Optuna search over ElasticNet's ``alpha`` and ``l1_ratio``, every trial an MLflow child run.

CLI: ``python -m demo_wine.tune --n-trials 2000 [--data PATH_OR_URL] [--storage URL]
[--study NAME] [--jobs N] [--experiment wine-tuning] [--seed 42] [--sampler tpe|random]
[--no-register] [--log-threads N]``.

* Objective: RMSE on a validation split (20 %) carved from the training split; the held-out
  test split (25 %) only scores the final, retrained model.
* One parent run per execution; each finished trial becomes a child run (see ``recorder``).
* ``--storage`` (e.g. ``mysql+pymysql://…/optuna``) joins a shared study (``load_if_exists``):
  Optuna's distributed mode; ``--n-trials`` counts this process's trials. ``--jobs`` runs
  that many optimizer threads in this process.
* Registration: a process registers only if it ran the study's best trial itself (or ran
  ``--n-trials 0``: "finalise the study"), retrains it on the full training split with
  artifacts, registers ``wine-elasticnet`` and moves alias ``champion`` to it only if the
  trial is still the study's best at that moment. So several workers finishing together
  register at most the trials that were best when each finished, and the alias ends on the
  overall best (a worker racing inside the few ms between check and set is the remaining
  window). Workers can pass ``--no-register`` and a coordinator runs ``--n-trials 0``.

The last stdout line is one JSON object (see :func:`tune`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from demo_wine import CHAMPION_ALIAS, MODEL_NAME
from demo_wine.data import DEFAULT_SEED, DEFAULT_VAL_SIZE
from demo_wine.errors import InputError, Parser, parse_int, parse_number, run_cli
from demo_wine.model import ALPHA_RANGE, L1_RATIO_RANGE

DEFAULT_STUDY = "wine-elasticnet"
STORAGE_ENV = "DEMO_WINE_STORAGE"  # the storage URL (with its password) off the command line
# The record service's socket on the server's host: trial runs go through it (recorder.py).
RECORDER_ENV = "DEMO_WINE_RECORDER"
# Or a tracking database this process may write itself (a local one): trial runs go there.
MLFLOW_DB_ENV = "DEMO_WINE_MLFLOW_DB"
DEFAULT_EXPERIMENT = "wine-tuning"
SAMPLERS = ("tpe", "random")


def redact(url: str | None) -> str:
    """Hide the password of a database URL."""
    if not url:
        return "in-memory"
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def _make_sampler(name: str, seed: int | None) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


# Processes opening a new shared study at once take turns (a named lock of the database
# server), so one creates Optuna's schema and the study while the others wait. Without it
# they race: a table created meanwhile, a duplicate row, MySQL's atomic DDL refusing a table
# another session is creating (error 1684), MariaDB's "Record has changed since last read"
# (1020) on alembic_version. Those are still retried, should a process not take the lock.
SCHEMA_LOCK = "demo_wine_optuna_schema"
RACES = ("already exists", "concurrent DDL", "IntegrityError", "Duplicate entry",
         "try restarting transaction")  # fmt: skip


@contextlib.contextmanager
def _schema_lock(storage: str | None, timeout_s: int = 120) -> Iterator[None]:
    """Hold the database server's named lock SCHEMA_LOCK (MySQL and MariaDB) meanwhile; a
    no-op for other storages, and when the database cannot be reached (opening the study
    then says why)."""
    if not storage or not storage.startswith("mysql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    try:
        conn = engine.connect()
    except sqlalchemy.exc.SQLAlchemyError:
        engine.dispose()
        yield
        return
    try:
        query = sqlalchemy.text("SELECT GET_LOCK(:name, :timeout)")
        conn.execute(query, {"name": SCHEMA_LOCK, "timeout": timeout_s})
        yield
    finally:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
            conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": SCHEMA_LOCK})
        conn.close()
        engine.dispose()


def _open_study(name: str, storage: str | None, sampler: Any, attempts: int = 5) -> Any:
    """Create or join the study; retry a lost race between workers creating the schema."""
    import optuna

    for attempt in range(1, attempts + 1):
        try:
            with _schema_lock(storage):
                study = optuna.create_study(
                    study_name=name,
                    storage=storage,
                    sampler=sampler,
                    direction="minimize",
                    load_if_exists=True,
                )
            break
        except (ImportError, ValueError) as exc:
            raise InputError(
                f"cannot open Optuna storage {redact(storage)}: {_first(exc)}"
            ) from None
        except Exception as exc:  # sqlalchemy errors: bad URL, unreachable database, races
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            racing = any(race in f"{type(exc).__name__}: {exc}" for race in RACES)
            if not racing or attempt == attempts:
                raise InputError(
                    f"cannot open Optuna storage {redact(storage)}: {_first(exc)}"
                ) from None
            time.sleep(0.2 * attempt)
    if study.direction.name != "MINIMIZE":
        raise InputError(f"study {name!r} exists but maximizes; use another --study")
    return study


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def tune(
    n_trials: int = 100,
    data: str | None = None,
    *,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    jobs: int = 1,
    experiment: str = DEFAULT_EXPERIMENT,
    register: bool = True,
    seed: int = DEFAULT_SEED,
    val_size: float = DEFAULT_VAL_SIZE,
    sampler: str = "tpe",
    recorder_threads: int | None = None,
) -> dict[str, Any]:
    """Run the search; return the JSON-able summary (keys documented in the README)."""
    started = time.perf_counter()
    n_trials = parse_int("n_trials", n_trials)
    jobs = parse_int("jobs", jobs, low=1)
    seed = parse_int("seed", seed)
    val_size = parse_number("val_size", val_size, low=0.05, high=0.5)
    if sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not study_name.strip():
        raise InputError("study name must not be empty")
    if n_trials == 0 and not storage:
        raise InputError("--n-trials 0 (finalise a study) needs --storage")

    from demo_wine.tracking import serialization_format, tracking_uri

    serialization_format()
    if storage and storage.strip() == tracking_uri():
        raise InputError("Optuna storage must not be the MLflow database (both use alembic)")

    from demo_wine.data import default_data_path, load_with_digest, split, validation_split

    source = data or default_data_path()
    frame, digest = load_with_digest(source)
    parts = split(frame, seed=seed)
    inner = validation_split(parts, val_size)
    x_fit, y_fit = inner.x_train.to_numpy(), inner.y_train.to_numpy()
    x_val, y_val = inner.x_test.to_numpy(), inner.y_test.to_numpy()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(study_name, storage, _make_sampler(sampler, None if storage else seed))

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from demo_wine.model import fit, scores
    from demo_wine.tracking import base_tags, configure, experiment_id

    uri = configure()
    client = MlflowClient()
    tags = {**base_tags(), "optuna.study": study_name}
    parent = os.environ.pop("MLFLOW_RUN_ID", "")  # under `mlflow run`: its run is the parent
    if parent:
        exp_id = client.get_run(parent).info.experiment_id
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in {**tags, "role": "tuning"}.items()])
    else:
        exp_id = experiment_id(experiment)
        parent = client.create_run(
            exp_id,
            tags={**tags, "role": "tuning"},
            run_name=f"{study_name}-{tags['host']}-{tags['pid']}",
        ).info.run_id
    context = {
        "study": study_name,
        "storage": redact(storage),
        "n_trials": n_trials,
        "jobs": jobs,
        "sampler": sampler,
        "seed": seed,
        "test_size": parts.test_size,
        "validation": f"holdout {val_size:g} of train",
        "val_size": val_size,
        "n_fit": len(y_fit),
        "n_val": len(y_val),
        "objective": "val_rmse",
        "alpha_range": f"{ALPHA_RANGE} log",
        "l1_ratio_range": str(L1_RATIO_RANGE),
        "data": source,
        "data_sha256": digest,
    }
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in context.items()])

    recorder, via = _recorder(client, uri, exp_id, parent, tags, recorder_threads or 0, jobs)

    def evaluate(alpha: float, l1_ratio: float) -> dict[str, float]:
        model = fit(x_fit, y_fit, alpha, l1_ratio, seed, quiet=False)
        return {f"val_{k}": v for k, v in scores(y_val, model.predict(x_val)).items()}

    def objective(trial: Any) -> float:
        alpha = trial.suggest_float("alpha", *ALPHA_RANGE, log=True)
        l1_ratio = trial.suggest_float("l1_ratio", *L1_RATIO_RANGE)
        metrics = evaluate(alpha, l1_ratio)
        recorder.note(trial.number, metrics)
        return metrics["val_rmse"]

    from demo_wine.outages import OutageGuard

    guard = OutageGuard(study, recorder)  # a database restart pauses the search, loses nothing
    status = "FAILED"
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning for tiny alpha
            guard.optimize(objective, n_trials, jobs)
        optimize_s = time.perf_counter() - t0
        recovered = 0
        if n_trials == 0:  # finalising a shared study: record what dead workers could not
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recovered = _recover(study, recorder, client, exp_id, study_name, evaluate)
        recorded = recorder.close()
        loop_s = time.perf_counter() - t0
        result = _finish(study, recorder, parts, parent, exp_id, context, register, n_trials)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        recorder.close()
        raise
    finally:
        if status != "FINISHED":
            client.set_terminated(parent, status=status)
    done = len(recorder.records) - recovered
    now = int(time.time() * 1000)
    summary = {
        "trials_done": float(done),
        "trials_recorded": float(recorded),
        "trials_recovered": float(recovered),
        "trials_per_s": done / loop_s if loop_s > 0 else 0.0,
        "optimize_s": optimize_s,
        "best_val_rmse": result["best_value"],
    }
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
    client.set_terminated(parent)
    mlflow.end_run()  # nothing should remain active in this process
    return {
        "study": study_name,
        "storage": redact(storage),
        "trials_done": done,
        "trials_recorded": recorded,
        "storage_outages": guard.outages,
        "trials_cut_off": len(guard.cut_off),
        "trials_recovered": recovered,
        "recorded_via": via,
        **result,
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "optimize_s": round(optimize_s, 3),
        "trials_per_s": round(summary["trials_per_s"], 2),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def _recover(study: Any, recorder: Any, client: Any, exp_id: str, name: str, evaluate: Any) -> int:
    """Record the study's finished trials that have no MLflow run in ``exp_id`` (a worker
    died before its recorder wrote them). Their metrics are recomputed: the fit is
    deterministic (same split, seed and parameters), so they equal the lost ones. Run this
    after the workers have stopped; returns the number of trials recorded here."""
    if "'" in name:
        sys.stderr.write(f"study name {name!r} has a quote: not checking for lost trial runs\n")
        return 0
    recorded: set[str] = set()
    token = None
    while True:
        page = client.search_runs(
            [exp_id], f"tags.`optuna.study` = '{name}'", max_results=1000, page_token=token
        )
        recorded |= {
            r.data.tags.get("optuna.trial", "")
            for r in page
            if r.data.tags.get("role") != "best-model"
        }
        token = page.token
        if not token:
            break
    missing = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and str(t.number) not in recorded
    ]
    for trial in missing:
        if trial.state.name == "COMPLETE":
            recorder.note(trial.number, evaluate(trial.params["alpha"], trial.params["l1_ratio"]))
        recorder(study, trial)
    if missing:
        sys.stderr.write(f"recorded {len(missing)} finished trials that had no MLflow run\n")
    return len(missing)


def _recorder(
    client: Any,
    uri: str,
    exp_id: str,
    parent: str,
    tags: dict[str, str],
    threads: int,
    jobs: int,
) -> tuple[Any, str]:
    """Where trial runs go: through the record service on the server's host
    (``$DEMO_WINE_RECORDER``, recorded_via "service"), into a tracking database this process
    may write (the local store, or ``$DEMO_WINE_MLFLOW_DB``: "database"), else through the
    server's REST API ("server")."""
    from demo_wine.recorder import (
        DatabaseStore,
        ServiceStore,
        StoreMismatch,
        StoreRecorder,
        TrialRecorder,
    )
    from demo_wine.tracking import is_remote

    service = os.environ.get(RECORDER_ENV, "").strip()
    if service:
        try:
            return StoreRecorder(ServiceStore(service, exp_id, parent, tags)), "service"
        except StoreMismatch as exc:
            sys.stderr.write(f"not recording through {service}: {exc}\n")
    store = os.environ.get(MLFLOW_DB_ENV, "").strip() or (None if is_remote(uri) else uri)
    if store:
        try:
            return StoreRecorder(DatabaseStore(store, exp_id, parent, tags)), "database"
        except StoreMismatch as exc:
            sys.stderr.write(f"not writing trial runs to {redact(store)} directly: {exc}\n")
    threads = threads or (max(8, 2 * jobs) if is_remote(uri) else 1)
    return TrialRecorder(client, exp_id, parent, tags, threads=threads), "server"


def _finish(
    study: Any,
    recorder: Any,
    parts: Any,
    parent: str,
    exp_id: str,
    context: dict[str, Any],
    register: bool,
    n_trials: int,
) -> dict[str, Any]:
    """Pick the study's best trial; retrain, register and alias it when it is ours to do."""
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"study {context['study']!r} has no completed trial yet") from None
    ours = best.number in recorder.records
    out: dict[str, Any] = {
        "trials_total": sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
        "best_trial": best.number,
        "best_params": dict(best.params),
        "best_value": best.value,
        "objective": "val_rmse",
        "best_trial_run_id": recorder.run_id(best.number),
        "best_run_id": None,
        "test_metrics": None,
        "model_uri": None,
        "registered_model": None,
        "registered_version": None,
        "alias_set": False,
    }
    if not register or not (ours or n_trials == 0):
        if register:
            sys.stderr.write(
                f"best trial {best.number} ran in another process: not registering here\n"
            )
        return out

    import mlflow
    from mlflow import MlflowClient

    from demo_wine.train import log_training

    with mlflow.start_run(experiment_id=exp_id, run_name="best-model", parent_run_id=parent):
        trained = log_training(
            parts,
            best.params["alpha"],
            best.params["l1_ratio"],
            artifacts=True,
            params={
                "data": context["data"],
                "data_sha256": context["data_sha256"],
                "study": context["study"],
                "best_trial": best.number,
            },
            tags={
                "optuna.study": context["study"],
                "optuna.trial": str(best.number),
                "role": "best-model",
            },
        )
    version = mlflow.register_model(
        trained["model_uri"],
        MODEL_NAME,
        tags={
            "optuna.study": context["study"],
            "optuna.trial": str(best.number),
            "val_rmse": repr(best.value),
        },
    )
    # Move the alias only if this trial is still the study's best (other workers may have
    # finished meanwhile with a better one and registered it).
    still_best = study.best_trial.number == best.number
    if still_best:
        MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version.version)
    out.update(
        best_run_id=trained["run_id"],
        test_metrics=trained["metrics"],
        model_uri=trained["model_uri"],
        registered_model=MODEL_NAME,
        registered_version=str(version.version),
        alias_set=still_best,
    )
    return out


def _parser() -> Parser:
    p = Parser(prog="python -m demo_wine.tune", description="Optuna search, tracked in MLflow.")
    p.add_argument("--n-trials", default="100", help="trials run by this process (default 100)")
    p.add_argument("--data", default=None, help="CSV path or http(s) URL")
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL shared by workers (default: in-memory)"
    )
    p.add_argument("--study", default=DEFAULT_STUDY, help="Optuna study name")
    p.add_argument("--jobs", default="1", help="optimizer threads in this process")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--seed", default=str(DEFAULT_SEED), help="split (and sampler) seed")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler")
    p.add_argument("--no-register", action="store_true", help="never register (workers)")
    p.add_argument(
        "--log-threads",
        default="0",
        help="threads recording trials in MLflow (default: 8 remote, 1 local)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from demo_wine.recorder import RecordingError

    args = _parser().parse_args(argv)
    parse_int("n_trials", args.n_trials)
    parse_int("jobs", args.jobs, low=1)
    try:
        result = _run(args)
    except RecordingError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


def _run(args: Any) -> dict[str, Any]:
    return tune(
        args.n_trials,
        args.data or None,
        storage=args.storage or os.environ.get(STORAGE_ENV) or None,
        study_name=args.study,
        jobs=args.jobs,
        experiment=args.experiment,
        register=not args.no_register,
        seed=args.seed,
        sampler=args.sampler,
        recorder_threads=parse_int("log_threads", args.log_threads),
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
