"""`invoke tune`'s env per process: the shared study as the tuning account (password on
stdin, never on a command line), and the record service on the server's own machine; no
process ever gets the tracking database's credential."""

from __future__ import annotations

import re

from mlflow_stack.actions import tune
from mlflow_stack.actions.remote import demo_command, secret_stdin
from mlflow_stack.engine.host import Target
from mlflow_stack.inventory import ResolvedHost
from mlflow_stack.layout import Layout
from mlflow_stack.secrets import Secret
from mlflow_stack.vars import validate

PASSWORD = Secret("p@ss/word")


def host(name: str, address: str, **vars_) -> ResolvedHost:
    return ResolvedHost(name, Target(name, address), (), validate(vars_))


SERVER = host("srv", "10.0.0.1", mysql={"port": 3307})
WORKER = host("w1", "10.0.0.2")


def test_one_process_on_the_server_records_through_the_service_and_holds_no_credential():
    assert tune.process_secrets(SERVER, SERVER, PASSWORD, shared=False) == {}
    assert tune.process_env(SERVER, SERVER) == {"DEMO_WINE_RECORDER": "/run/mlflow-recorder.sock"}


def test_shared_studies_use_the_tuning_account_and_workers_log_through_the_server():
    on_server = tune.process_secrets(SERVER, SERVER, PASSWORD, shared=True)
    elsewhere = tune.process_secrets(SERVER, WORKER, PASSWORD, shared=True)
    assert on_server["DEMO_WINE_STORAGE"].reveal() == (
        "mysql+pymysql://optuna:p%40ss%2Fword@127.0.0.1:3307/optuna"
    )
    assert (
        elsewhere["DEMO_WINE_STORAGE"]
        .reveal()
        .endswith(
            "@10.0.0.1:3307/optuna?ssl_ca=/etc/mlflow-stack/db-ca.pem"  # over TLS, its CA pinned
        )
    )
    assert tune.process_env(SERVER, WORKER) == {}  # the server's REST API
    for env in (on_server, elsewhere):  # never MLflow's database nor its account
        assert all(re.match(r"mysql\+pymysql://optuna:[^@]+@[\d.]+:3307/optuna(\?|$)", v.reveal())
                   for v in env.values())  # fmt: skip


def test_secrets_travel_on_stdin_and_never_on_the_command_line():
    env = tune.process_secrets(SERVER, SERVER, PASSWORD, shared=True)
    cmd = demo_command(
        Layout.of(SERVER.vars),
        ["-m", "demo_wine.tune"],
        env=tune.process_env(SERVER, SERVER),
        secret_env=tuple(env),
    )
    assert "p%40ss" not in cmd and "p@ss" not in cmd
    assert cmd.startswith("IFS= read -r DEMO_WINE_STORAGE && export DEMO_WINE_STORAGE && ")
    assert "DEMO_WINE_RECORDER=/run/mlflow-recorder.sock" in cmd
    assert secret_stdin(*env.values()).splitlines() == [v.reveal() for v in env.values()]


def test_a_failed_process_is_reported_with_how_to_add_the_missing_trials():
    outcome = tune.TuneOutcome("field", {"e2e": 31}, {"e2e#0": "service"}, requested=60)
    outcome.failures.append("e2e#1: cannot open Optuna storage")
    lines = tune.render_outcome(outcome)
    assert lines[-2] == "warning: e2e#1: cannot open Optuna storage"
    assert lines[-1] == (
        "warning: 31 of 60 trials done; the study keeps them: "
        "invoke tune --study field --n-trials 29 adds the rest"
    )
    outcome.failures.clear()
    assert not any(line.startswith("warning") for line in tune.render_outcome(outcome))
