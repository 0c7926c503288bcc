"""`invoke train`: one tracked training run on the host, as the demo user, output streamed."""

from __future__ import annotations

import math
from collections.abc import Callable

from mlflow_stack.actions.remote import (
    ActionError,
    Layout,
    demo_command,
    error_tail,
    last_json_line,
    require_provisioned,
)
from mlflow_stack.engine.host import Host


def parse_float(flag: str, value, low: float, high: float | None = None) -> float:
    """A finite float within bounds, else a one-line `ActionError` naming the flag."""
    try:
        number = float(str(value))
    except ValueError:
        raise ActionError(f"{flag} {value!r}: not a number") from None
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise ActionError(f"{flag} {value}: must be {bounds}")
    return number


def run_url(layout: Layout, result: dict) -> str:
    return f"{layout.tracking_uri}/#/experiments/{result['experiment_id']}/runs/{result['run_id']}"


def train(
    host: Host,
    layout: Layout,
    alpha: float,
    l1_ratio: float,
    experiment: str,
    printer: Callable[[str], None],
    artifacts: bool = True,
) -> dict:
    """Run demo_wine.train on the host (forked from its warm runner when there is one, see
    `demo_wine.warm`); its JSON result line."""
    require_provisioned(host, layout)
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
    result = host.run(demo_command(layout, args), on_output=printer, timeout=600)
    parsed = last_json_line(result.stdout)
    if not result.ok or parsed is None:
        raise ActionError(f"training on {host.name} failed: {error_tail(result)}")
    return parsed
