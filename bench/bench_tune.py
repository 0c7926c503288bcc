"""Tuning throughput with every trial recorded in MLflow, against a real `mlflow server`.

Starts `mlflow server` (SQLite backend, artifacts proxied, 127.0.0.1, free port) once per worker
setting, then measures in the same run:

* ours-db  — ``python -m demo_wine.tune --n-trials N --no-register`` with
             ``DEMO_WINE_MLFLOW_DB`` set to the server's database: trial runs are written
             straight into it, many per transaction (what `invoke tune` does on the server host);
* ours     — the same through the server's REST API (create_run + one log_batch +
             set_terminated per trial, from a background thread pool; workers on other hosts);
* naive    — one ``start_run(nested=True)`` + ``log_param``/``log_metric`` per value;
* callback — optuna-integration's ``MLflowCallback`` (nested runs).

The two references run fewer trials (``--ref-trials``) and are extrapolated per trial. Server
CPU per trial (all processes of the server's session) shows where the time goes.

    .venv/bin/python bench/bench_tune.py [--n-trials 2000] [--ref-trials 100] [--workers 1,default]
                                         [--kinds ours-db,ours,naive,callback]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import DEFAULT_DATA, REPO, run_json

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system) of every live process in session ``sid``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # fields[3] is the session id (field 6 of stat)
                total += int(fields[11]) + int(fields[12])
    return total / TICKS


@contextlib.contextmanager
def mlflow_server(workers: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """`mlflow server` on a fresh SQLite DB; yields (url, session id); stops it after."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir}/mlflow.db",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers != "default":
        cmd += ["--workers", workers]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (workdir / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {workdir}/server.log")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started, by its id
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def bench_ours(url: str, n: int, data: str, workdir: Path, direct: bool) -> dict:
    """Our tuner; ``direct``: trial runs straight into the server's database (its SQLite
    file here, the MySQL backend on a host), else through the server's REST API."""
    env = {"MLFLOW_TRACKING_URI": url}
    if direct:
        env["DEMO_WINE_MLFLOW_DB"] = f"sqlite:///{workdir}/mlflow.db"
    args = ["--n-trials", str(n), "--no-register", "--data", data]
    args += ["--experiment", "bench-ours", "--study", f"bench-{time.time_ns()}"]
    wall, result = run_json("demo_wine.tune", args, cwd=workdir, env=env)
    want = "database" if direct else "server"
    if result["recorded_via"] != want:
        raise RuntimeError(f"trials were recorded via {result['recorded_via']}, not {want}")
    return {
        "trials": result["trials_recorded"],
        "wall": wall,
        "loop": result["trials_done"] / result["trials_per_s"],
        "optimize": result["optimize_s"],
        "cpu": result["_cpu_s"],
    }


def _arrays(data: str):
    from demo_wine.data import load_wine, split, validation_split

    inner = validation_split(split(load_wine(data)))
    return (
        inner.x_train.to_numpy(),
        inner.y_train.to_numpy(),
        inner.x_test.to_numpy(),
        inner.y_test.to_numpy(),
    )


def bench_reference(kind: str, url: str, n: int, data: str) -> dict:
    """The naive or the MLflowCallback way, in this process, ``n`` trials."""
    import warnings

    import mlflow
    import optuna

    from demo_wine.model import fit, scores

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"bench-{kind}")
    xf, yf, xv, yv = _arrays(data)

    def evaluate(trial):
        a = trial.suggest_float("alpha", 1e-4, 10.0, log=True)
        r = trial.suggest_float("l1_ratio", 0.0, 1.0)
        return a, r, scores(yv, fit(xf, yf, a, r, quiet=False).predict(xv))

    def naive(trial):
        a, r, m = evaluate(trial)
        with mlflow.start_run(nested=True, run_name=f"trial-{trial.number}"):
            mlflow.log_param("alpha", a)
            mlflow.log_param("l1_ratio", r)
            mlflow.set_tag("optuna.trial", trial.number)
            for k, v in m.items():
                mlflow.log_metric(f"val_{k}", v)
        return m["rmse"]

    def plain(trial):
        return evaluate(trial)[2]["rmse"]

    callbacks = []
    if kind == "callback":
        from optuna_integration.mlflow import MLflowCallback

        callbacks = [
            MLflowCallback(
                tracking_uri=url,
                metric_name="val_rmse",
                create_experiment=False,
                mlflow_kwargs={"nested": True},
            )
        ]
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=1))
    with warnings.catch_warnings(), mlflow.start_run(run_name=f"bench-{kind}"):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        study.optimize(naive if kind == "naive" else plain, n_trials=n, callbacks=callbacks)
        wall = time.perf_counter() - t0
    return {"trials": n, "wall": wall}


KINDS = ("ours-db", "ours", "naive", "callback")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-trials", type=int, default=2000)
    p.add_argument("--ref-trials", type=int, default=100)
    p.add_argument("--workers", default="1,default", help="comma list: 1, 2, default (=4)")
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma list of {', '.join(KINDS)} (default all)",
    )
    p.add_argument("--data", default=os.environ.get("DEMO_WINE_DATA", str(DEFAULT_DATA)))
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        p.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.path.insert(0, str(REPO))
    n = args.n_trials
    print(
        f"mlflow server (SQLite backend, 127.0.0.1), {os.cpu_count()} cores; "
        f"goal: {n} recorded trials in <= 60 s",
        flush=True,
    )
    for workers in args.workers.split(","):
        with (
            tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp,
            mlflow_server(workers, Path(tmp)) as (url, sid),
        ):
            label = "default (4)" if workers == "default" else workers
            print(f"\n--workers {label}", flush=True)
            rows = []
            for kind in kinds:
                cpu0 = session_cpu(sid)
                if kind.startswith("ours"):
                    r = bench_ours(url, n, args.data, Path(tmp), direct=kind == "ours-db")
                else:
                    r = bench_reference(kind, url, args.ref_trials, args.data)
                r["server_cpu"] = session_cpu(sid) - cpu0
                ours = kind.startswith("ours")
                per = (r["loop"] if ours else r["wall"]) / r["trials"]
                rows.append((kind, r, per))
                extra = (
                    f"; process wall {r['wall']:.1f} s (CPU {r['cpu']:.1f} s), "
                    f"optimizer alone {r['optimize']:.1f} s"
                    if ours
                    else f"; {n} extrapolated: {per * n:.0f} s"
                )
                print(
                    f"  {kind:8} measured {r['trials']:5d} trials in "
                    f"{r['loop'] if ours else r['wall']:7.1f} s = "
                    f"{1 / per:6.1f} trials/s, {per * 1000:6.1f} ms/trial, server CPU "
                    f"{r['server_cpu'] / r['trials'] * 1000:5.1f} ms/trial{extra}",
                    flush=True,
                )
            best = min(per for _, _, per in rows)
            print(
                "  per trial relative to the fastest: "
                + ", ".join(f"{k} x{per / best:.1f}" for k, _, per in rows),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
