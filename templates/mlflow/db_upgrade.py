"""Create or migrate the MLflow tracking schema; the store URI comes from an env file.

Run as the service user: `python db_upgrade.py /etc/mlflow/mlflow.env`. The URI holds the
database password, so it is read from the 0600 file, never taken from the command line.
"""

import sys

from mlflow.store.db import utils


def store_uri(env_file: str) -> str:
    with open(env_file) as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and key == "MLFLOW_BACKEND_STORE_URI":
                return value
    raise SystemExit(f"{env_file}: no MLFLOW_BACKEND_STORE_URI")


engine = utils.create_sqlalchemy_engine_with_retry(store_uri(sys.argv[1]))
if utils._is_empty_database(engine):
    utils._initialize_tables(engine)
else:
    utils._upgrade_db(engine)
print(utils._get_schema_version(engine))
