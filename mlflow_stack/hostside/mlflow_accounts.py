"""Runs on the host with the system python3: bring MLflow's two own accounts to what the
secret store says, through the tracking server's auth REST API on 127.0.0.1.

Input on stdin, one JSON object (never on the command line):
    {"url": "http://127.0.0.1:5000", "admin": "admin", "passwords": [new, older, ...],
     "workload": "demo", "workload_password": "..."}

* The admin: MLflow reads its configured password only when it first creates the user, so a
  new one is applied through the API: the first of `passwords` that logs in is the admin's
  current one; when it is not the first (the wanted one), the admin changes its password to
  it (`users/update-password` with `current_password`).
* The workload account (the host's own work: train, tune, Jupyter kernels, model servers): a
  non-admin user, created when missing. Created, it is granted MANAGE on every experiment and
  registered model that exists: they were made by the host's work before accounts existed
  (later ones, their creator manages). A wrong password is reset by the admin.

Prints one JSON line: {"admin": "ok"|"rotated", "workload": "ok"|"created"|"reset",
"adopted": N} or {"error": "..."} (exit 1).
"""

import base64
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


class Api:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def call(self, method, path, auth, body=None, params=None):
        """(status, decoded JSON or None)."""
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Basic {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                text = answer.read()
                return answer.status, (json.loads(text) if text.strip() else None)
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, None

    def wait(self, seconds=300):
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=3) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(emit(error=f"MLflow at {self.url} does not answer /health"))
            time.sleep(0.5)

    def logs_in(self, user, password):
        status, _ = self.call("GET", "/api/2.0/mlflow/users/current", (user, password))
        if status not in (200, 401):
            # MLflow without its basic-auth app answers 404 here: not a login question
            raise SystemExit(emit(error=f"users/current answered HTTP {status}: is auth on?"))
        return status == 200


def emit(**fields):
    """Print the result line (an error goes to stderr too); the exit code."""
    print(json.dumps(fields), flush=True)
    if "error" in fields:
        print(fields["error"], file=sys.stderr, flush=True)
        return 1
    return 0


def ensure_admin(api, user, passwords):
    """The admin's working password made the first one; which it was."""
    wanted = passwords[0]
    for index, password in enumerate(passwords):
        if not api.logs_in(user, password):
            continue
        if index == 0:
            return "ok", wanted
        body = {"username": user, "password": wanted, "current_password": password}
        status, answer = api.call(
            "PATCH", "/api/2.0/mlflow/users/update-password", (user, password), body
        )
        if status != 200:
            message = (answer or {}).get("message", "")
            raise SystemExit(emit(error=f"changing the admin password: HTTP {status} {message}"))
        if not api.logs_in(user, wanted):
            raise SystemExit(emit(error="the admin password was changed but does not log in"))
        return "rotated", wanted
    raise SystemExit(
        emit(
            error=f"MLflow user {user!r} logs in with none of the passwords in the secret store "
            "(mlflow_admin_password, mlflow_admin_password_previous): set the current one with "
            "MLFLOW_ADMIN_PASSWORD for one provision run"
        )
    )


def every(api, admin, path, key, token_key="next_page_token", method="GET", body=None):
    """All items of a paged search (as the admin, who sees everything)."""
    items, token = [], None
    while True:
        if method == "GET":
            params = {"max_results": 1000, **({"page_token": token} if token else {})}
            status, answer = api.call("GET", path, admin, params=params)
        else:
            payload = {**(body or {}), "max_results": 1000}
            if token:
                payload["page_token"] = token
            status, answer = api.call("POST", path, admin, payload)
        if status != 200:
            raise SystemExit(emit(error=f"{path}: HTTP {status}"))
        items += (answer or {}).get(key, [])
        token = (answer or {}).get(token_key)
        if not token:
            return items


def grant(api, admin, user, resource_type, resource_id):
    body = {
        "username": user,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "permission": "MANAGE",
    }
    status, answer = api.call("POST", "/api/3.0/mlflow/users/permissions/grant", admin, body)
    if status != 200:
        message = (answer or {}).get("message", "")
        raise SystemExit(emit(error=f"granting {resource_type} {resource_id}: {status} {message}"))


def ensure_workload(api, admin, user, password):
    if api.logs_in(user, password):
        return "ok", 0
    status, _ = api.call("GET", "/api/2.0/mlflow/users/get", admin, params={"username": user})
    if status == 200:
        body = {"username": user, "password": password}
        status, answer = api.call("PATCH", "/api/2.0/mlflow/users/update-password", admin, body)
        if status != 200:
            raise SystemExit(emit(error=f"resetting {user}'s password: HTTP {status}"))
        return "reset", 0
    if status != 404:
        raise SystemExit(emit(error=f"looking up MLflow user {user}: HTTP {status}"))
    status, answer = api.call(
        "POST", "/api/2.0/mlflow/users/create", admin, {"username": user, "password": password}
    )
    if status != 200:
        message = (answer or {}).get("message", "")
        raise SystemExit(emit(error=f"creating MLflow user {user}: HTTP {status} {message}"))
    experiments = every(
        api,
        admin,
        "/api/2.0/mlflow/experiments/search",
        "experiments",
        method="POST",
        body={"view_type": "ALL"},
    )
    models = every(api, admin, "/api/2.0/mlflow/registered-models/search", "registered_models")
    for experiment in experiments:
        grant(api, admin, user, "experiment", experiment["experiment_id"])
    for model in models:
        grant(api, admin, user, "registered_model", model["name"])
    return "created", len(experiments) + len(models)


def main():
    spec = json.loads(sys.stdin.read())
    api = Api(spec["url"])
    api.wait()
    admin_state, admin_password = ensure_admin(api, spec["admin"], spec["passwords"])
    admin = (spec["admin"], admin_password)
    workload_state, adopted = ensure_workload(
        api, admin, spec["workload"], spec["workload_password"]
    )
    return emit(admin=admin_state, workload=workload_state, adopted=adopted)


if __name__ == "__main__":
    sys.exit(main())
