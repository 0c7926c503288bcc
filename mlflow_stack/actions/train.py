"""`invoke train`: one tracked training run on the host, as the demo user, output streamed."""

from __future__ import annotations

from collections.abc import Callable

from mlflow_stack.actions.remote import (
    ActionError,
    demo_command,
    last_json_line,
    require_provisioned,
)
from mlflow_stack.engine.host import Host
from mlflow_stack.layout import Layout


def run_url(place: Layout, result: dict) -> str:
    return f"{place.tracking_uri}/#/experiments/{result['experiment_id']}/runs/{result['run_id']}"


def train(
    host: Host,
    place: Layout,
    alpha: float,
    l1_ratio: float,
    experiment: str,
    printer: Callable[[str], None],
    artifacts: bool = True,
) -> dict:
    """Run demo_wine.train on the host (forked from its warm runner when there is one, see
    `demo_wine.warm`); its JSON result line."""
    require_provisioned(host, place)
    args = [
        "-m",
        "demo_wine.warm",
        "run",
        "demo_wine.train",
        "--alpha",
        repr(alpha),
        "--l1-ratio",
        repr(l1_ratio),
        "--experiment",
        experiment,
    ]
    if not artifacts:
        args.append("--no-artifacts")
    result = host.run(demo_command(place, args), on_output=printer, timeout=600)
    parsed = last_json_line(result.stdout)
    if not result.ok or parsed is None:
        raise ActionError(f"training on {host.name} failed: {result.tail()}")
    return parsed
