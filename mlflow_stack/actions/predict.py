"""`invoke predict`: score wines against a served model (the original demo's sample by default)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from mlflow_stack.actions.remote import ActionError
from mlflow_stack.engine.host import Host

# The original demo's sample wine.
SAMPLE_WINE = {
    "alcohol": 12.8,
    "chlorides": 0.029,
    "citric acid": 0.48,
    "density": 0.98,
    "fixed acidity": 6.2,
    "free sulfur dioxide": 29,
    "pH": 3.33,
    "residual sugar": 1.2,
    "sulphates": 0.39,
    "total sulfur dioxide": 75,
    "volatile acidity": 0.66,
}


def dataframe_split(rows: list[dict]) -> dict:
    """MLflow's `dataframe_split` payload (columns + data) for a list of records."""
    columns = list(rows[0])
    return {
        "dataframe_split": {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}
    }


def load_payload(path: str | None) -> dict:
    """The request body: the sample wine, a JSON file (sent as is) or a CSV file."""
    if not path:
        return dataframe_split([SAMPLE_WINE])
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ActionError(f"--data {path}: {exc.strerror}") from None
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ActionError(
                f"--data {path}: not valid JSON ({exc.msg}, line {exc.lineno})"
            ) from None
    sample = text[:2048]
    delimiter = ";" if sample.count(";") > sample.count(",") else ","
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        raise ActionError(f"--data {path}: no rows")
    rows = [{k: _number(v) for k, v in row.items() if k != "quality"} for row in rows]
    return dataframe_split(rows)


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def parse_predictions(body: str) -> list[float]:
    data = json.loads(body)
    values = data.get("predictions", data) if isinstance(data, dict) else data
    return [float(v[0] if isinstance(v, list) else v) for v in values]


def server_error(body: str, limit: int = 400) -> str:
    """One line from an MLflow scoring server's error answer: its innermost `Error: ...` part
    (MLflow nests the causes, each with a dump of the data), without the echoed input or the
    protocol-change notice."""
    try:
        answer = json.loads(body)
        message = answer.get("message", body) if isinstance(answer, dict) else body
    except json.JSONDecodeError:
        message = body
    message = message.rsplit("Error: ", 1)[-1]
    message = message.split("\nInput:", 1)[0].split("IMPORTANT:", 1)[0]
    line = " ".join(message.split())
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line or "no message"


def predict(host: Host, port: int, payload: dict) -> list[float]:
    """POST the payload to the model server on the host; 4xx answers become one-line errors."""
    script = (
        f"curl -s -w '\\n%{{http_code}}' -X POST http://127.0.0.1:{port}/invocations "
        "-H 'Content-Type: application/json' --data-binary @-"
    )
    result = host.run(script, stdin=json.dumps(payload), sudo=False)
    body, _, code = result.stdout.rpartition("\n")
    if code.strip() in ("", "000"):
        raise ActionError(
            f"no model server answers on port {port} of {host.name}; start one with invoke serve"
        )
    return predictions_of(code.strip(), body)


def predictions_of(code: str, body: str) -> list[float]:
    """The predictions of a scoring server's answer; a refusal as a one-line error."""
    if not code.startswith("2"):
        raise ActionError(
            f"the model server refused the request (HTTP {code.strip()}): {server_error(body)}"
        )
    predictions = parse_predictions(body)
    if not all(math.isfinite(p) for p in predictions):
        raise ActionError(f"the model returned non-finite predictions: {predictions}")
    return predictions


def predict_public(client, name: str, token, payload: dict) -> list[float]:
    """Score through the public site, as an outside client: HTTPS verified against the pin,
    the model's bearer token."""
    from mlflow_stack import public

    path = f"{public.MODELS_PREFIX}{name}/invocations"
    answer = client.request("POST", path, bearer=token, body=payload)
    if answer.status == 401:
        raise ActionError(f"the proxy refused model {name}'s token (HTTP 401)")
    return predictions_of(str(answer.status), answer.text)


def predict_served(
    host: Host, name: str, port: int | None, payload: dict, resolved=None
) -> list[float]:
    """Score `payload` against the served instance `name` (or whatever listens on `port`):
    through the public site when the model is public there, else on the host over SSH."""
    if port is None and resolved is not None:
        from mlflow_stack import public

        if public.is_public(resolved.vars):
            from mlflow_stack.actions import public as site

            models = site.models_fact()
            client, values = site.outside(host, resolved.vars, resolved.target.address, [models])
            token = site.parse_models(values[models.key]).get(name)
            if token is not None:
                return predict_public(client, name, token, payload)
    if port is None:
        from mlflow_stack.actions.serve import served

        port = served(host).get(name)
        if port is None:
            raise ActionError(
                f"no served model named {name!r} on {host.name}; start one with invoke serve"
            )
    return predict(host, port, payload)
