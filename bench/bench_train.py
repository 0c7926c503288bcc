"""Wall time of ``python -m demo_wine.train`` (process start to exit), median of N runs.

Against a fresh `mlflow server` (SQLite backend, 1 worker, 127.0.0.1) and against the embedded
default (``sqlite:///mlflow.db`` in a temp dir), with and without the decision artifacts.

    .venv/bin/python bench/bench_train.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import mlflow_server
from child import DEFAULT_DATA, run_json


def timed_train(uri: str, cwd: Path, data: str, *extra: str) -> tuple[float, float]:
    args = ["--data", data, "--experiment", "bench", *extra]
    wall, result = run_json("demo_wine.train", args, cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    return wall, result["elapsed_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--data", default=os.environ.get("DEMO_WINE_DATA", str(DEFAULT_DATA)))
    args = p.parse_args()
    print(f"demo_wine.train wall time, median of {args.runs} (in-process time in brackets)")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        with mlflow_server("1", work) as (url, _):
            targets = [("mlflow server (1 worker)", url), ("local sqlite:///", None)]
            for label, uri in targets:
                uri = uri or f"sqlite:///{work}/local.db"
                timed_train(uri, work, args.data, "--no-artifacts")  # warm-up (schema, caches)
                for extra in ((), ("--no-artifacts",)):
                    runs = [timed_train(uri, work, args.data, *extra) for _ in range(args.runs)]
                    wall = statistics.median(r[0] for r in runs)
                    inner = statistics.median(r[1] for r in runs)
                    what = "model only" if extra else "model + artifacts"
                    print(f"  {label:26} {what:18} {wall:5.2f} s  ({inner:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
