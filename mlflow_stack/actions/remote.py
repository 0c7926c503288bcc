"""What every remote action shares: running demo code as the demo user, reading secrets,
reading results."""

from __future__ import annotations

import json
import shlex

from mlflow_stack import layout
from mlflow_stack.engine.host import Host
from mlflow_stack.errors import UserError
from mlflow_stack.layout import Layout
from mlflow_stack.secrets import Secret, problem


class ActionError(UserError):
    """An action failed; the message is one line saying what and what to do."""


def demo_command(
    place: Layout,
    args: list[str],
    env: dict[str, str] | None = None,
    secret_env: tuple[str, ...] = (),
) -> str:
    """Shell running `python ARGS` from the demo env, as the demo user, in the demo dir.

    Values in `env` are on the command line, so never secrets. Each name in `secret_env` is
    read from one line of stdin instead (see `secret_stdin`) and exported to the process.
    """
    variables = {
        "HOME": layout.DEMO_STATE,
        "MLFLOW_TRACKING_URI": place.tracking_uri,
        "DEMO_WINE_DATA": layout.DEMO_DATA,
        "PYTHONPATH": layout.DEMO_ROOT,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 sends usage data by default
        "PYTHONPYCACHEPREFIX": layout.DEMO_PYCACHE,
        **(env or {}),
    }
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
    command = " ".join(shlex.quote(a) for a in [place.demo_python, *args])
    reads = "".join(f"IFS= read -r {name} && export {name} && " for name in secret_env)
    return (
        f"{reads}cd {layout.DEMO_STATE} && runuser -u {layout.DEMO_USER} -- "
        f"env {assignments} {command}"
    )


def secret_stdin(*values: Secret) -> str:
    """Stdin for a `demo_command` with `secret_env`: one value per line, in order."""
    return "".join(v.reveal() + "\n" for v in values)


def require_provisioned(host: Host, place: Layout) -> None:
    """Fail clearly when the host has no demo env or demo code yet."""
    check = f"test -x {place.demo_python} && test -d {layout.DEMO_CODE}"
    if not host.run(check).ok:
        raise ActionError(
            f"{host.name}: not provisioned (no demo env or demo code); "
            f"run: invoke provision --host {host.name}"
        )


def read_secret(host: Host, name: str) -> Secret:
    result = host.run(f"cat {layout.secret_path(name)}")
    value = result.stdout.strip()
    if not result.ok or not value:
        raise ActionError(
            f"{host.name}: secret {name} not found; run: invoke provision --host {host.name}"
        )
    why = problem(value)
    if why:  # an older version accepted it; provision replaces it
        raise ActionError(
            f"{host.name}: secret {name} is unusable ({why}); "
            f"run: invoke provision --host {host.name}"
        )
    return Secret(value)


def last_json_line(output: str) -> dict | None:
    """The last line of `output` that parses as a JSON object."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None
