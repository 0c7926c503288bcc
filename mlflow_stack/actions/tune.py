"""`invoke tune`: an Optuna search on one host, or one study shared by workers on many.

With one process on one host the study is local (in memory). Otherwise every process joins
one study in the server's `optuna` database (Optuna's distributed mode) with the tuning
account (rights on `optuna` alone; its password travels on stdin, never on a command line),
all log to the one MLflow server, and when they are done the server finalises: registers the
best trial as `wine-elasticnet` and points the `champion` alias at it. Processes on the
server's machine write their trial runs through its record service (a socket; the service
holds the tracking database's credential, they never do); the rest go through the server.
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
RECORDER_ENV = "DEMO_WINE_RECORDER"


def split_trials(total: int, slots: int) -> list[int]:
    """`total` trials over `slots` processes, as even as possible (larger shares first)."""
    base, extra = divmod(total, slots)
    return [base + (1 if i < extra else 0) for i in range(slots)]


def storage_url(password: Secret, db_host: str, port: int) -> Secret:
    """The shared study's storage, as the tuning account (database `optuna` only); from
    another host over TLS, the server's certificate checked against its pinned CA."""
    user = layout.TUNING_DB_USER
    tls = "" if db_host == "127.0.0.1" else f"?ssl_ca={layout.DB_CA_ON_WORKERS}"
    return Secret(
        f"mysql+pymysql://{user}:{quote(password.reveal(), safe='')}@{db_host}:{port}/optuna{tls}"
    )


def reach(server: ResolvedHost, worker: ResolvedHost) -> str:
    """How a worker reaches the server's services: loopback when they share a machine, else
    the server's private address."""
    same = worker.target.address == server.target.address
    return "127.0.0.1" if same else server.peer_address


def pin_database_ca(server: Host, workers: list[Host]) -> None:
    """Give the workers the CA of the server's database certificate (read from the server
    over SSH, written as root where only root writes): their connections check it."""
    from mlflow_stack.engine.steps import install_file_script

    ca = server.run(f"cat {layout.DB_CA}")
    if not ca.ok or "BEGIN CERTIFICATE" not in ca.stdout:
        raise ActionError(
            f"{server.name}: no database CA for workers ({layout.DB_CA}); the server has no "
            f"workers in the inventory: add them to the `workers` group and provision it"
        )
    for worker in workers:
        script = install_file_script(layout.DB_CA_ON_WORKERS, "root", "root", 0o644)
        worker.check(f"mkdir -p {layout.DB_CA_ON_WORKERS.rsplit('/', 1)[0]} && {script}",
                     f"the database CA on {worker.name}", stdin=ca.stdout)  # fmt: skip


def process_secrets(
    server: ResolvedHost, worker: ResolvedHost, password: Secret | None, shared: bool
) -> dict[str, Secret]:
    """Env (name -> secret, sent on stdin) of one tuning process on `worker`: the shared
    study's storage, as the tuning account."""
    if password is None or not shared:
        return {}
    return {STORAGE_ENV: storage_url(password, reach(server, worker), server.vars.mysql.port)}


def process_env(server: ResolvedHost, worker: ResolvedHost) -> dict[str, str]:
    """Plain env of one tuning process: on the server's machine, its record service."""
    return {RECORDER_ENV: layout.RECORDER_SOCKET} if reach(server, worker) == "127.0.0.1" else {}


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
    recorded_via: dict[str, str] = field(default_factory=dict)  # host#process -> how
    failures: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    requested: int = 0
    seconds: float = 0.0


def tune_args(n_trials: int, study: str, experiment: str, register: bool) -> list[str]:
    """demo_wine.tune, forked from the host's warm runner when it has one (its pages shared,
    MLflow, scikit-learn and Optuna already imported), else started cold."""
    args = [
        "-m",
        "demo_wine.warm",
        "run",
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
    env: dict[str, str],
    secrets: dict[str, Secret],
    printer: Callable[[str], None],
) -> dict:
    """Run demo_wine.tune with `env`; `secrets` (env name -> value) are sent on stdin."""
    names = tuple(secrets)
    stdin = secret_stdin(*secrets.values()) if secrets else None
    result = host.run(
        demo_command(place, args, env=env, secret_env=names),
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
    outcome = TuneOutcome(study, requested=n_trials)
    server_host = connections[server.name]
    password = read_secret(server_host, "db_tuning_password") if shared else None
    elsewhere = [h for h in hosts if reach(server, h) != "127.0.0.1"]
    if elsewhere:
        pin_database_ca(server_host, [connections[h.name] for h in elsewhere])
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
                process_env(server, h),
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
            outcome.recorded_via[f"{r.host}#{r.index}"] = str(r.result.get("recorded_via", "?"))
    if not any(r.result for r in results):
        raise ActionError("every tuning process failed: " + "; ".join(outcome.failures))
    if shared:
        outcome.final = _run_process(
            server_host,
            Layout.of(server.vars),
            tune_args(0, study, experiment, register=True),
            process_env(server, server),
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
    via = ", ".join(f"{k} {v}" for k, v in outcome.recorded_via.items())
    lines = [
        f"study {outcome.study}: {sum(outcome.trials_per_host.values())} trials in "
        f"{outcome.seconds:.1f}s  ({per_host})",
        f"trial runs recorded via: {via}",
        f"best: {params}  val_rmse={final.get('best_value', float('nan')):.4f}  "
        f"run {final.get('best_run_id')}",
        f"champion: models:/wine-elasticnet@champion -> version {version}"
        if version
        else "champion: not changed (the best trial was registered before)",
    ]
    lines += [f"warning: {failure}" for failure in outcome.failures]
    done = sum(outcome.trials_per_host.values())
    if outcome.failures and done < outcome.requested:
        lines.append(
            f"warning: {done} of {outcome.requested} trials done; the study keeps them: "
            f"invoke tune --study {outcome.study} --n-trials {outcome.requested - done} "
            "adds the rest"
        )
    return lines
