"""`invoke demo`: the original conference walkthrough as one command, on the local sandbox.

provision → train twice → tune → serve the champion → predict the sample wine → check MySQL
→ a summary. Each step's failure stops the demo with that step's own error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from mlflow_stack.actions import check_mysql as checking
from mlflow_stack.actions import predict as scoring
from mlflow_stack.actions import serve as serving
from mlflow_stack.actions import train as training
from mlflow_stack.actions import tune as tuning
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.report import Reporter, Status, StepResult
from mlflow_stack.errors import UserError
from mlflow_stack.inventory import Inventory, ResolvedHost, resolve
from mlflow_stack.layout import Layout
from mlflow_stack.provision import RoleCatalog, first_failure, provision
from mlflow_stack.secrets import mask

SANDBOX = "sandbox"
ALPHAS = (0.42, 0.1)
SERVE_PORT = 54321


class DemoError(UserError):
    """A demo step failed; the message names the step and its own error."""


@dataclass
class Summary:
    runs: list[dict] = field(default_factory=list)
    tuning: dict = field(default_factory=dict)
    trials: int = 0
    served: serving.ServeResult | None = None
    prediction: float | None = None
    checks_ok: bool = False
    provision_changed: int = 0
    steps: dict[str, float] = field(default_factory=dict)


class ProgressReporter(Reporter):
    """Provisioning progress for the demo: a line for every change, a dot for the rest."""

    dots = False

    def step(self, result: StepResult) -> None:
        if result.status == Status.OK:
            self.stream.write(".")
            self.stream.flush()
            self.dots = True
            return
        if self.dots:
            self.stream.write("\n")
            self.dots = False
        super().step(result)


def sandbox_of(inventory: Inventory, name: str) -> str | None:
    """The local sandbox behind inventory host `name`, if it is one."""
    entry = inventory.model.hosts.get(name)
    if entry is not None:
        return entry.sandbox
    from mlflow_stack import sandbox

    return name if sandbox.load(name) or name == SANDBOX else None


def stop_sandbox(inventory: Inventory, host_name: str) -> str | None:
    """Stop the sandbox behind the demo host (`--no-keep`); its name, or None."""
    name = sandbox_of(inventory, host_name)
    if name:
        from mlflow_stack import sandbox

        sandbox.down(name)
    return name


def ensure_sandbox(
    name: str | None, fresh: bool, say: Callable[[str], None], size: dict | None = None
) -> None:
    """Start the sandbox behind the demo host unless it runs (or stop it first if fresh);
    `size` ({cpus, memory}) confines a new one."""
    size = {k: v for k, v in (size or {}).items() if v}
    if name is None:
        if size:
            raise DemoError("--cpus and --memory size a sandbox: this host is not one")
        return
    from mlflow_stack import sandbox

    if fresh and sandbox.load(name):
        say(f"stopping sandbox {name} (--fresh)")
        sandbox.down(name)
    if sandbox.load(name) is None:
        limits = ", ".join(f"{k} {v}" for k, v in size.items()) or "no limits"
        say(f"starting sandbox {name} (Debian 12, systemd, private network, {limits})")
        info = sandbox.up(name, **size)
        say(f"sandbox {name} is up: ssh {info.host_string}")
    elif size:
        raise DemoError(f"sandbox {name} is running with its own size: add --fresh to resize it")
    else:
        say(f"sandbox {name} is running")


def run_demo(
    inventory: Inventory,
    catalog: RoleCatalog,
    *,
    fresh: bool,
    trials: int,
    host_name: str = SANDBOX,
    serve_port: int = SERVE_PORT,
    out: TextIO = sys.stdout,
    size: dict | None = None,
) -> Summary:
    summary = Summary()

    def say(text: str) -> None:
        print(mask(text), file=out, flush=True)

    def step(name: str, action: Callable[[], object]):
        say(f"\n== {name}")
        started = time.monotonic()
        try:
            value = action()
        except UserError as exc:
            raise DemoError(f"{name}: {exc}") from None
        summary.steps[name] = time.monotonic() - started
        return value

    step("sandbox", lambda: ensure_sandbox(sandbox_of(inventory, host_name), fresh, say, size))
    (resolved,) = resolve(host_name, inventory)
    place = Layout.of(resolved.vars)
    host = Host(resolved.target)
    try:
        step("provision", lambda: _provision(resolved, catalog, summary, out))
        for alpha in ALPHAS:
            step(
                f"train alpha={alpha}",
                lambda a=alpha: summary.runs.append(
                    training.train(host, place, a, 0.1, "wine", lambda line: None)
                ),
            )
            run = summary.runs[-1]
            say(
                f"run {run['run_id']}: rmse={run['metrics']['rmse']:.4f} "
                f"r2={run['metrics']['r2']:.4f}"
            )
        outcome = step(
            f"tune {trials} trials",
            lambda: tuning.tune(
                resolved,
                [resolved],
                {resolved.name: host},
                trials,
                "wine-elasticnet",
                "wine-tuning",
                1,
                lambda who, line: None,
            ),
        )
        summary.tuning, summary.trials = outcome.final, sum(outcome.trials_per_host.values())
        say(
            f"best val_rmse={outcome.final.get('best_value', float('nan')):.4f} "
            f"({summary.trials} trials, {outcome.seconds:.1f}s)"
        )
        req = serving.ServeRequest("wine", "models:/wine-elasticnet@champion", serve_port, 0)
        summary.served = step("serve the champion", lambda: serving.serve(host, resolved.vars, req))
        say(f"{summary.served.url} serves {summary.served.uri}")
        prediction = step(
            "predict the sample wine",
            lambda: scoring.predict(host, serve_port, scoring.load_payload(None)),
        )
        summary.prediction = prediction[0]
        say(f"predicted quality: {summary.prediction:.3f}")
        checks, counts = step("check-mysql", lambda: checking.check_mysql(host, place))
        say(checking.render_table(checks, counts))
        summary.checks_ok = all(c.ok for c in checks)
        if not summary.checks_ok:
            failed = next(c for c in checks if not c.ok)
            raise DemoError(f"check-mysql: {failed.name}: {failed.detail}; hint: {failed.hint}")
    finally:
        host.close()
    say(render_summary(summary, place, serve_port))
    return summary


def _provision(resolved: ResolvedHost, catalog: RoleCatalog, summary: Summary, out: TextIO) -> None:
    recaps = provision([resolved], catalog, ProgressReporter(out))
    summary.provision_changed = recaps[0].summary()["changed"]
    failure = first_failure(recaps)
    if failure:
        raise DemoError(failure)


def render_summary(s: Summary, place: Layout, serve_port: int) -> str:
    best = min((r["metrics"]["rmse"] for r in s.runs), default=float("nan"))
    final = s.tuning
    rows = [
        ("training runs", ", ".join(r["run_id"][:8] for r in s.runs)),
        ("best RMSE (single runs)", f"{best:.4f}"),
        ("tuning", f"{s.trials} trials, best val_rmse {final.get('best_value', float('nan')):.4f}"),
        (
            "champion",
            f"models:/wine-elasticnet@champion = version "
            f"{final.get('registered_version') or '(unchanged)'}",
        ),
        ("served", f"{s.served.url if s.served else '-'}"),
        ("prediction (sample wine)", f"{s.prediction:.3f}" if s.prediction is not None else "-"),
        ("check-mysql", "passed" if s.checks_ok else "FAILED"),
        ("provisioning changes", str(s.provision_changed)),
        ("MLflow", f"{place.tracking_uri}/  (through the tunnel below)"),
        ("Jupyter", f"{place.jupyter_url}/lab  (through the tunnel; token: invoke urls --reveal)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "== summary"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [
        "",
        "Open the UIs: `invoke tunnel` forwards them (only SSH reaches the host, as on EC2).",
        "Try it yourself on the host (`invoke sandbox.ssh`):",
        "  " + serving.curl_example(serve_port),
    ]
    return "\n".join(lines)
