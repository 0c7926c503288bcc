"""Fill a provisioned host's MLflow quickly, on the host: runs by direct SQL, artifact files
written straight into the artifact store (both read back through the server like any other).

    python bulk_fill.py db --runs 10000 --exps 10           as root, the mlflow env's Python
    python bulk_fill.py files --kb 420 < runs.jsonl         as the mlflow account

`db` inserts what the client would write (runs, their mlflow.* tags, 10 params, 5 metrics of
50 steps and their latest values) through the tracking server's own account (the URI from
/etc/mlflow/mlflow.env; foreign-key and unique checks off for the load, ~185 runs/s) and prints
one JSON line per run (experiment, run id). `files` writes each listed run's artifacts: a
model-like blob (random, incompressible), its MLmodel, a metrics JSON (text, compressible)
and a plot-like blob: about `--kb` kB per run, 4 files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid

ENV_FILE = "/etc/mlflow/mlflow.env"
ARTIFACTS = "/var/lib/mlflow/artifacts"


def connect():
    from urllib.parse import unquote, urlparse

    import pymysql

    with open(ENV_FILE) as handle:
        uri = next(
            line.split("=", 1)[1].strip()
            for line in handle
            if line.startswith("MLFLOW_BACKEND_STORE_URI=")
        )
    parts = urlparse(uri.replace("mysql+pymysql://", "mysql://"))
    return pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=unquote(parts.username),
        password=unquote(parts.password),
        database=parts.path.lstrip("/"),
        autocommit=False,
    )


def fill_db(runs: int, exps: int, params: int = 10, metrics: int = 5, steps: int = 50) -> None:
    conn = connect()
    cur = conn.cursor()
    cur.execute("SET unique_checks=0, foreign_key_checks=0")
    cur.execute("SELECT COALESCE(MAX(experiment_id), 0) FROM experiments")
    base = cur.fetchone()[0] + 1
    now = int(time.time() * 1000)
    experiments = []
    for i in range(exps):
        eid = base + i
        experiments.append(eid)
        cur.execute(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, "
            "creation_time, last_update_time, workspace) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (eid, f"bench-{eid}", f"mlflow-artifacts:/{eid}", "active", now, now, "default"),
        )
    sql = {
        "runs": "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
        "user_id, status, start_time, end_time, source_version, lifecycle_stage, artifact_uri, "
        "experiment_id, deleted_time) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        "tags": "INSERT INTO tags (`key`, value, run_uuid) VALUES (%s, %s, %s)",
        "params": "INSERT INTO params (`key`, value, run_uuid) VALUES (%s, %s, %s)",
        "metrics": "INSERT INTO metrics (`key`, value, timestamp, run_uuid, step, is_nan) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        "latest": "INSERT INTO latest_metrics (`key`, value, timestamp, step, is_nan, run_uuid) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
    }
    rows: dict[str, list] = {k: [] for k in sql}
    rnd = random.Random(7)
    for n in range(runs):
        rid, eid = uuid.uuid4().hex, experiments[n % len(experiments)]
        start = now - (runs - n) * 1000
        rows["runs"].append(
            (rid, f"run-{n}", "LOCAL", "bulk_fill.py", "", "bench", "FINISHED", start,
             start + 900, "", "active", f"mlflow-artifacts:/{eid}/{rid}/artifacts", eid, None)
        )  # fmt: skip
        tags = {
            "mlflow.runName": f"run-{n}",
            "mlflow.user": "bench",
            "mlflow.source.name": "bulk_fill.py",
            "mlflow.source.type": "LOCAL",
        }
        rows["tags"] += [(key, value, rid) for key, value in tags.items()]
        for p in range(params):
            rows["params"].append((f"p{p}", str(round(rnd.random(), 6)), rid))
        for m in range(metrics):
            value = 0.0
            for step in range(steps):
                value = rnd.random()
                rows["metrics"].append((f"m{m}", value, start + step, rid, step, 0))
            rows["latest"].append((f"m{m}", value, start + steps - 1, steps - 1, 0, rid))
        print(json.dumps([eid, rid]))
        if len(rows["metrics"]) >= 20_000 or n == runs - 1:
            for kind, statement in sql.items():
                if rows[kind]:
                    cur.executemany(statement, rows[kind])
                    rows[kind].clear()
            conn.commit()
    conn.commit()


def fill_files(kb: int) -> None:
    rnd = random.Random(11)
    size = kb * 1024
    for line in sys.stdin:
        eid, rid = json.loads(line)
        root = os.path.join(ARTIFACTS, str(eid), rid, "artifacts")
        os.makedirs(os.path.join(root, "model"), exist_ok=True)
        with open(os.path.join(root, "model", "model.pkl"), "wb") as out:
            out.write(rnd.randbytes(int(size * 0.45)))
        with open(os.path.join(root, "model", "MLmodel"), "w") as out:
            out.write(f"artifact_path: model\nrun_id: {rid}\nflavors: {{}}\n")
        values = [round(rnd.random(), 6) for _ in range(int(size * 0.35 / 10))]
        with open(os.path.join(root, "metrics.json"), "w") as out:
            json.dump({"per_sample_error": values}, out)
        with open(os.path.join(root, "plot.png"), "wb") as out:
            out.write(rnd.randbytes(int(size * 0.2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    db = sub.add_parser("db")
    db.add_argument("--runs", type=int, default=10_000)
    db.add_argument("--exps", type=int, default=10)
    files = sub.add_parser("files")
    files.add_argument("--kb", type=int, default=420)
    args = parser.parse_args()
    if args.what == "db":
        fill_db(args.runs, args.exps)
    else:
        fill_files(args.kb)


if __name__ == "__main__":
    main()
