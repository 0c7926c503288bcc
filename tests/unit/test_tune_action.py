"""`invoke tune`'s secrets per process: the shared study, and the MLflow database only on the
server's own machine with a MySQL backend (never on a command line)."""

from __future__ import annotations

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


def test_one_process_on_the_server_gets_only_the_mlflow_database():
    env = tune.process_secrets(SERVER, SERVER, PASSWORD, shared=False)
    assert set(env) == {"DEMO_WINE_MLFLOW_DB"}
    assert env["DEMO_WINE_MLFLOW_DB"].reveal() == (
        "mysql+pymysql://mlflow:p%40ss%2Fword@127.0.0.1:3307/mlflow"
    )
    assert "p%40ss" not in str(env["DEMO_WINE_MLFLOW_DB"])


def test_workers_elsewhere_share_the_study_and_log_through_the_server():
    on_server = tune.process_secrets(SERVER, SERVER, PASSWORD, shared=True)
    elsewhere = tune.process_secrets(SERVER, WORKER, PASSWORD, shared=True)
    assert set(on_server) == {"DEMO_WINE_STORAGE", "DEMO_WINE_MLFLOW_DB"}
    assert on_server["DEMO_WINE_STORAGE"].reveal().endswith("@127.0.0.1:3307/optuna")
    assert set(elsewhere) == {"DEMO_WINE_STORAGE"}
    assert elsewhere["DEMO_WINE_STORAGE"].reveal().endswith("@10.0.0.1:3307/optuna")


def test_sqlite_backend_or_no_password_means_no_direct_writes():
    sqlite_server = host("srv", "10.0.0.1", mlflow={"backend": "sqlite"})
    assert tune.process_secrets(sqlite_server, sqlite_server, PASSWORD, shared=False) == {}
    assert tune.process_secrets(SERVER, SERVER, None, shared=False) == {}


def test_secrets_travel_on_stdin_in_the_order_read():
    env = tune.process_secrets(SERVER, SERVER, PASSWORD, shared=True)
    cmd = demo_command(Layout.of(SERVER.vars), ["-m", "demo_wine.tune"], secret_env=tuple(env))
    assert "p%40ss" not in cmd
    assert cmd.index("read -r DEMO_WINE_STORAGE") < cmd.index("read -r DEMO_WINE_MLFLOW_DB")
    lines = secret_stdin(*env.values()).splitlines()
    assert lines == [v.reveal() for v in env.values()]
