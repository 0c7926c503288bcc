"""`invoke tune`: an Optuna search on one host, or one study shared by workers on many.

With one process on one host the study is local (in memory). Otherwise every process joins
one study in the server's `optuna` database (Optuna's distributed mode), all log to the one
MLflow server, and when they are done the server finalises: registers the best trial as
`wine-elasticnet` and points the `champion` alias at it. Processes on the server's machine
(MySQL backend) write their trial runs straight into the MLflow database (see
demo_wine/recorder.py); the rest goes through the server. Database credentials travel on
stdin, never on a command line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import quote

from mlflow_stack import layout
from mlflow_stack.actions.remote import (
    ActionError,
    demo_command,
    last_json_line,
    read_secret,
    require_provisioned,
    secret_stdin,
)
from mlflow_stack.engine.host import Host
from mlflow_stack.layout import Layout
from mlflow_stack.secrets import Secret
from mlflow_stack.targets import ResolvedHost

if TYPE_CHECKING:
    from mlflow_stack.inventory import Inventory

STORAGE_ENV = "DEMO_WINE_STORAGE"
MLFLOW_DB_ENV = "DEMO_WINE_MLFLOW_DB"


def split_trials(total: int, slots: int) -> list[int]:
    """`total` trials over `slots` processes, as even as possible (larger shares first)."""
    base, extra = divmod(total, slots)
    return [base + (1 if i < extra else 0) for i in range(slots)]


def storage_url(password: Secret, db_host: str, port: int) -> Secret:
    return Secret(
        f"mysql+pymysql://mlflow:{quote(password.reveal(), safe='')}@{db_host}:{port}/optuna"
    )


def mlflow_db_url(password: Secret, port: int) -> Secret:
    """The MLflow server's backend database, as seen from the server's own machine."""
    return Secret(layout.tracking_db_uri("mysql", password.reveal(), port))


def reach(server: ResolvedHost, worker: ResolvedHost) -> str:
    """How a worker reaches the server's services: loopback when they share a machine."""
    same = worker.target.address == server.target.address
    return "127.0.0.1" if same else server.target.address


def process_secrets(
    server: ResolvedHost, worker: ResolvedHost, password: Secret | None, shared: bool
) -> dict[str, Secret]:
    """Env (name -> secret, sent on stdin) of one tuning process on `worker`: the shared
    study's storage, and the MLflow database when the worker is the server's machine and the
    backend is MySQL (trial runs go there directly)."""
    out = {}
    if password is None:
        return out
    if shared:
        out[STORAGE_ENV] = storage_url(password, reach(server, worker), server.vars.mysql.port)
    if server.vars.mlflow.backend == "mysql" and reach(server, worker) == "127.0.0.1":
        out[MLFLOW_DB_ENV] = mlflow_db_url(password, server.vars.mysql.port)
    return out


@dataclass
class ProcessResult:
    host: str
    index: int
    result: dict | None
    error: str = ""


@dataclass
class TuneOutcome:
    study: str
    trials_per_host: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    seconds: float = 0.0


def tune_args(n_trials: int, study: str, experiment: str, register: bool) -> list[str]:
    args = [
        "-m",
        "demo_wine.tune",
        "--n-trials",
        str(n_trials),
        "--study",
        study,
        "--experiment",
        experiment,
    ]
    return args if register else [*args, "--no-register"]


def _run_process(
    host: Host,
    place: Layout,
    args: list[str],
    secrets: dict[str, Secret],
    printer: Callable[[str], None],
) -> dict:
    """Run demo_wine.tune; `secrets` (env name -> value) are sent on stdin."""
    names = tuple(secrets)
    stdin = secret_stdin(*secrets.values()) if secrets else None
    result = host.run(
        demo_command(place, args, secret_env=names),
        stdin=stdin,
        on_output=printer,
        timeout=6 * 3600,
    )
    parsed = last_json_line(result.stdout)
    if not result.ok or parsed is None:
        raise ActionError(result.tail())
    return parsed


def tune(
    server: ResolvedHost,
    hosts: list[ResolvedHost],
    connections: dict[str, Host],
    n_trials: int,
    study: str,
    experiment: str,
    per_host: int,
    printer: Callable[[str, str], None],
) -> TuneOutcome:
    """Run the search; every process's result and the server's final registration."""
    started = time.monotonic()
    for h in hosts:
        require_provisioned(connections[h.name], Layout.of(h.vars))
    slots = [(h, i) for h in hosts for i in range(per_host)]
    shares = split_trials(n_trials, len(slots))
    shared = len(slots) > 1
    outcome = TuneOutcome(study)
    server_host = connections[server.name]
    direct = server.vars.mlflow.backend == "mysql"
    password = read_secret(server_host, "db_password") if shared or direct else None
    lock = threading.Lock()

    def secrets_for(h: ResolvedHost) -> dict[str, Secret]:
        return process_secrets(server, h, password, shared)

    def work(slot_share):
        (h, index), share = slot_share
        place = replace(
            Layout.of(h.vars), tracking_host=reach(server, h), mlflow_port=server.vars.mlflow.port
        )
        args = tune_args(share, study, experiment, register=not shared)
        try:
            res = _run_process(
                connections[h.name],
                place,
                args,
                secrets_for(h),
                lambda line: printer(f"{h.name}#{index}", line),
            )
            return ProcessResult(h.name, index, res)
        except ActionError as exc:
            with lock:
                outcome.failures.append(f"{h.name}#{index}: {exc}")
            return ProcessResult(h.name, index, None, str(exc))

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        results = list(
            pool.map(work, [(s, n) for s, n in zip(slots, shares, strict=True) if n > 0])
        )
    for r in results:
        if r.result is not None:
            outcome.trials_per_host[r.host] = outcome.trials_per_host.get(r.host, 0) + int(
                r.result.get("trials_done", 0)
            )
    if not any(r.result for r in results):
        raise ActionError("every tuning process failed: " + "; ".join(outcome.failures))
    if shared:
        outcome.final = _run_process(
            server_host,
            Layout.of(server.vars),
            tune_args(0, study, experiment, register=True),
            secrets_for(server),
            lambda line: printer(f"{server.name}:final", line),
        )
    else:
        outcome.final = results[0].result or {}
    outcome.seconds = time.monotonic() - started
    return outcome


def choose_hosts(
    inv: Inventory, hosts: str | None, group: str | None
) -> tuple[ResolvedHost, list[ResolvedHost]]:
    """The server (the first of the `server` group) and the hosts that tune: `hosts`, or
    the members of `group` with the server joining them, else the server alone."""
    from mlflow_stack.inventory import default_host_spec, resolve

    if hosts and group:
        raise ActionError("give --hosts or --group, not both")
    server = resolve(default_host_spec(inv), inv)[0]
    chosen = resolve(hosts or group, inv) if (hosts or group) else [server]
    if group and server.name not in [h.name for h in chosen]:
        chosen = [server, *chosen]
    return server, chosen


def default_study(shared: bool) -> str:
    """A new study per shared search (its trials stay apart), else the one local study."""
    return f"wine-{time.strftime('%Y%m%d-%H%M%S')}" if shared else "wine-elasticnet"


def render_outcome(outcome: TuneOutcome) -> list[str]:
    """The lines `invoke tune` prints: trials per host, the best trial, the champion."""
    final = outcome.final
    per_host = ", ".join(f"{k}: {v}" for k, v in outcome.trials_per_host.items())
    params = ", ".join(f"{k}={v:.4g}" for k, v in (final.get("best_params") or {}).items())
    version = final.get("registered_version")
    lines = [
        f"study {outcome.study}: {sum(outcome.trials_per_host.values())} trials in "
        f"{outcome.seconds:.1f}s  ({per_host})",
        f"best: {params}  val_rmse={final.get('best_value', float('nan')):.4f}  "
        f"run {final.get('best_run_id')}",
        f"champion: models:/wine-elasticnet@champion -> version {version}"
        if version
        else "champion: not changed (the best trial was registered before)",
    ]
    return lines + [f"warning: {failure}" for failure in outcome.failures]
