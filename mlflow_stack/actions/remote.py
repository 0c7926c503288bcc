"""What every remote action shares: the host's layout, running demo code, reading secrets."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from mlflow_stack.engine.context import SECRETS_DIR
from mlflow_stack.engine.host import Host, RunResult
from mlflow_stack.inventory import ResolvedHost
from mlflow_stack.secrets import Secret


class ActionError(Exception):
    """An action failed; the message is one line saying what and what to do."""


@dataclass(frozen=True)
class Layout:
    """Where provisioning put things on a host (from its vars)."""

    prefix: str
    mlflow_port: int
    jupyter_port: int
    demo_user: str = "demo"
    demo_root: str = "/opt/demo"
    tracking_host: str = "127.0.0.1"  # where the MLflow server is, seen from this host

    @classmethod
    def of(cls, resolved: ResolvedHost) -> Layout:
        v = resolved.vars
        return cls(v.python.prefix, v.mlflow.port, v.jupyter.port)

    @property
    def demo_python(self) -> str:
        return f"{self.prefix}/envs/demo/bin/python"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.tracking_host}:{self.mlflow_port}"

    @property
    def data_path(self) -> str:
        return f"{self.demo_root}/data/winequality-white.csv"


def demo_command(
    layout: Layout,
    args: list[str],
    env: dict[str, str] | None = None,
    secret_env: tuple[str, ...] = (),
) -> str:
    """Shell running `python ARGS` from the demo env, as the demo user, in the demo dir.

    Values in `env` are on the command line, so never secrets. Each name in `secret_env` is
    read from one line of stdin instead (see `secret_stdin`) and exported to the process.
    """
    variables = {
        "HOME": layout.demo_root,
        "MLFLOW_TRACKING_URI": layout.tracking_uri,
        "DEMO_WINE_DATA": layout.data_path,
        "PYTHONPATH": layout.demo_root,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 sends usage data by default
        "PYTHONPYCACHEPREFIX": f"{layout.demo_root}/.cache/pycache",
        **(env or {}),
    }
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
    command = " ".join(shlex.quote(a) for a in [layout.demo_python, *args])
    reads = "".join(f"IFS= read -r {name} && export {name} && " for name in secret_env)
    return (
        f"{reads}cd {layout.demo_root} && runuser -u {layout.demo_user} -- "
        f"env {assignments} {command}"
    )


def secret_stdin(*values: Secret) -> str:
    """Stdin for a `demo_command` with `secret_env`: one value per line, in order."""
    return "".join(v.reveal() + "\n" for v in values)


def require_provisioned(host: Host, layout: Layout) -> None:
    """Fail clearly when the host has no demo env or demo code yet."""
    check = f"test -x {layout.demo_python} && test -d {layout.demo_root}/demo_wine"
    if not host.run(check).ok:
        raise ActionError(
            f"{host.name}: not provisioned (no demo env or demo code); "
            f"run: invoke provision --host {host.name}"
        )


def read_secret(host: Host, name: str) -> Secret:
    result = host.run(f"cat {SECRETS_DIR}/{name}")
    if not result.ok or not result.stdout.strip():
        raise ActionError(
            f"{host.name}: secret {name} not found; run: invoke provision --host {host.name}"
        )
    return Secret(result.stdout.strip())


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


def stream(host: Host, script: str, printer: Callable[[str], None], **kwargs) -> RunResult:
    """Run `script`, passing each output line (stdout) to `printer` as it arrives."""
    return host.run(script, on_output=printer, **kwargs)


def error_tail(result: RunResult, lines: int = 1) -> str:
    text = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return " | ".join(text[-lines:]) if text else f"exit {result.rc}"
