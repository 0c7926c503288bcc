"""Fill an MLflow server with what an older MLflow makes, on the host, with that MLflow.

    python old_mlflow_fill.py TAG SAMPLE_JSON      (MLFLOW_TRACKING_URI set)

Run by tests/e2e/test_upgrade_e2e.py with the host's mlflow env (MLflow 2.22.5 or 3.0.1 and
scikit-learn, from tests/e2e/requirements/): an experiment `old-TAG` with two ElasticNet runs
(params, a metric history, a tag, a text artifact of a few hundred kB, the model), both
registered as `wine-old-TAG` (versions 1 and 2), the alias `champion` on version 2, a model
version tag, and one deleted run. Prints one JSON line: the run ids, the champion's prediction
for the sample wine, and the MLflow version.
"""

from __future__ import annotations

import csv
import json
import sys

import mlflow
import pandas as pd
from mlflow import MlflowClient
from sklearn.linear_model import ElasticNet

DATA = "/opt/demo/demo_wine/data/winequality-white.csv"


def main() -> None:
    tag, sample = sys.argv[1], json.loads(sys.argv[2])
    with open(DATA) as handle:
        rows = list(csv.DictReader(handle, delimiter=";"))[:500]
    frame = pd.DataFrame(rows).astype(float)
    features = frame.drop(columns=["quality"])
    target = frame["quality"]
    client = MlflowClient()
    name = f"wine-old-{tag}"
    experiment = mlflow.set_experiment(f"old-{tag}").experiment_id
    major = int(mlflow.__version__.split(".")[0])
    runs, models = [], []
    for alpha in (0.9, 0.1):
        with mlflow.start_run() as run:
            model = ElasticNet(alpha=alpha, l1_ratio=0.2, random_state=0).fit(features, target)
            mlflow.log_param("alpha", alpha)
            for step in range(10):
                mlflow.log_metric("loss", 1.0 / (step + 1) + alpha, step=step)
            mlflow.set_tag("made_by", f"mlflow {mlflow.__version__}")
            mlflow.log_text("wine\n" * 60_000, "notes/big.txt")  # ~300 kB
            where = {"name": "model"} if major >= 3 else {"artifact_path": "model"}
            mlflow.sklearn.log_model(
                model, registered_model_name=name, input_example=features.iloc[:2], **where
            )
            runs.append(run.info.run_id)
            models.append(model)
    client.set_registered_model_alias(name, "champion", "2")
    client.set_model_version_tag(name, "2", "stage", "champion")
    with mlflow.start_run() as doomed:
        mlflow.log_param("doomed", 1)
    client.delete_run(doomed.info.run_id)
    wine = pd.DataFrame([sample])[list(features.columns)]
    print(
        json.dumps(
            {
                "version": mlflow.__version__,
                "experiment": experiment,
                "runs": runs,
                "deleted": doomed.info.run_id,
                "model": name,
                "prediction": float(models[1].predict(wine)[0]),
            }
        )
    )


if __name__ == "__main__":
    main()
