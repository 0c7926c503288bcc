"""Runs on the host with the system python3: resolve a model reference through MLflow's REST
API and print one JSON line, {"uri": ...} or {"error": ...}. Arguments: TRACKING_URI REF.
With MLFLOW_TRACKING_USERNAME/PASSWORD in the environment (public mode), it logs in."""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def get(base, path, **params):
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 404):
            return None
        raise


def resolve(base, ref):
    if ref.startswith("runs:/") or ("/" not in ref and ":" not in ref):
        run_id = ref[len("runs:/") :].split("/")[0] if ref.startswith("runs:/") else ref
        run = get(base, "runs/get", run_id=run_id)
        if run is None:
            return {"error": f"unknown run id {run_id!r}: no such run on the tracking server"}
        outputs = run["run"].get("outputs", {}).get("model_outputs", [])
        models = [get(base, f"logged-models/{o['model_id']}") for o in outputs]
        models = [m["model"]["info"] for m in models if m]
        if not models:
            return {"error": f"run {run_id} has no logged model to serve"}
        chosen = next((m for m in models if m.get("name") == "model"), models[0])
        return {"uri": f"models:/{chosen['model_id']}", "run_id": run_id}
    if not ref.startswith("models:/"):
        return {"error": f"{ref!r}: expected a run id, runs:/RUN_ID/model or models:/NAME@ALIAS"}
    body = ref[len("models:/") :]
    if body.startswith("m-") and "/" not in body and "@" not in body:
        model = get(base, f"logged-models/{body}")
        if model is None:
            return {"error": f"unknown logged model {body!r}"}
        return {"uri": ref, "run_id": model["model"]["info"].get("source_run_id", "")}
    if "@" in body:
        name, alias = body.split("@", 1)
        version = get(base, "registered-models/alias", name=name, alias=alias)
        if version is None:
            return {
                "error": f"unknown model alias {name}@{alias}: no registered model "
                f"{name!r} with alias {alias!r}"
            }
    elif "/" in body:
        name, number = body.split("/", 1)
        version = get(base, "model-versions/get", name=name, version=number)
        if version is None:
            return {"error": f"unknown model version {name}/{number}"}
    else:
        return {"error": f"{ref!r}: give an alias (models:/NAME@ALIAS) or a version"}
    mv = version["model_version"]
    return {
        "uri": mv["source"]
        if mv["source"].startswith("models:/m-")
        else f"models:/{mv['name']}/{mv['version']}",
        "run_id": mv.get("run_id", ""),
        "version": mv["version"],
    }


def main(base, ref, wait_s=60.0):
    """Resolve, waiting up to `wait_s` for a tracking server that is (re)starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return resolve(base, ref)
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                return {
                    "error": f"tracking server {base} does not answer ({exc}); "
                    "is mlflow-server.service running?"
                }
            time.sleep(1)


print(json.dumps(main(sys.argv[1].rstrip("/"), sys.argv[2])))
