"""Create or migrate the MLflow tracking schema; the store URI comes from an env file.

Run as the service user: `python db_upgrade.py /etc/mlflow/mlflow.env [--no-lock]`. The URI
holds the database password, so it is read from the 0600 file, never taken from the command
line. `--no-lock`: the caller holds the lock (`stackdata.py upgrade`, which backs up first).

One migration at a time: a run whose controller was killed leaves its migration running on the
host, and a second one started meanwhile would replay the same DDL. MySQL/MariaDB: a named lock
(`GET_LOCK`) held by a session for the whole migration; SQLite: a file lock beside the database.
"""

import contextlib
import fcntl
import sys

import sqlalchemy
from mlflow.store.db import utils

LOCK_NAME = "mlflow_stack_schema"
LOCK_WAIT_S = 900


def store_uri(env_file: str) -> str:
    with open(env_file) as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and key == "MLFLOW_BACKEND_STORE_URI":
                return value
    raise SystemExit(f"{env_file}: no MLFLOW_BACKEND_STORE_URI")


@contextlib.contextmanager
def exclusive(engine):
    """Hold the schema lock; wait up to LOCK_WAIT_S for another migration to finish."""
    if engine.dialect.name == "mysql":
        with engine.connect() as conn:
            query = sqlalchemy.text("SELECT GET_LOCK(:name, :wait)")
            if conn.execute(query, {"name": LOCK_NAME, "wait": LOCK_WAIT_S}).scalar() != 1:
                raise SystemExit(f"another schema migration still runs after {LOCK_WAIT_S} s")
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
    elif engine.dialect.name == "sqlite" and engine.url.database:
        with open(f"{engine.url.database}.migrate.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
    else:
        yield


def is_empty(engine) -> bool:
    """No tables yet (MLflow before 3.x has no `_is_empty_database`)."""
    check = getattr(utils, "_is_empty_database", None)
    return check(engine) if check else not sqlalchemy.inspect(engine).get_table_names()


engine = utils.create_sqlalchemy_engine_with_retry(store_uri(sys.argv[1]))
with contextlib.nullcontext() if "--no-lock" in sys.argv[2:] else exclusive(engine):
    if is_empty(engine):
        utils._initialize_tables(engine)
    else:
        utils._upgrade_db(engine)
print(utils._get_schema_version(engine))
