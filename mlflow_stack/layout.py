"""Where everything lives on a provisioned host: accounts, directories, files, units, sockets.

The one source of truth for the host's layout: roles build it, actions and the demo use it.
Fixed names are module constants; what depends on a host's variables (the Python prefix, the
ports) comes from `Layout.of(vars)`. The roles that build it are `ROLES`, in order.

Trust boundaries: code, configuration and data that services run or read are root's and
read-only to them (`/opt/mlflow`, `/opt/demo`, `/etc/...`). Each service account writes only
in its own areas under /var/lib, /var/cache and /run (`*_STATE`, `*_CACHE`), which root never
writes inside: systemd creates them for the units, and anything else there is done as the
account itself. The accounts' passwd homes are root's directories (no SSH keys can be planted),
their shells nologin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from mlflow_stack.engine.facts import OsInfo
    from mlflow_stack.vars_view import HostVars

# --- the roles, in the order `provision` runs them ---------------------------------------

# `proxy` last: it fronts what the others run (and closes the front when nothing is public)
ROLES = ("anaconda", "mysql", "mlflow_server", "jupyter", "demo_files", "proxy")
WORKER_ROLES = ("anaconda", "demo_files")  # hosts of the `workers` group only tune

# --- secrets -----------------------------------------------------------------------------

SECRETS_DIR = "/etc/mlflow-stack/secrets"


def secret_path(name: str) -> str:
    return f"{SECRETS_DIR}/{name}"


# --- Python environments (under the `python.prefix` variable) ----------------------------

MLFLOW_ENV = "mlflow"  # the tracking server's
DEMO_ENV = "demo"  # Jupyter's, the demo's and the model servers'
ENVS = (MLFLOW_ENV, DEMO_ENV)


def env_dir(prefix: str, name: str) -> str:
    """The directory of the Python env `name` under the `python.prefix` `prefix`."""
    return f"{prefix}/envs/{name}"


# --- the MLflow tracking server ----------------------------------------------------------

NOLOGIN = "/usr/sbin/nologin"
STACK_CACHE = "/var/cache/mlflow-stack"  # root's

MLFLOW_USER = "mlflow"
MLFLOW_HOME = "/opt/mlflow"  # root's: the launcher and the migration script; the passwd home
MLFLOW_LAUNCHER = f"{MLFLOW_HOME}/server.py"
MLFLOW_DB_UPGRADE = f"{MLFLOW_HOME}/db_upgrade.py"
MLFLOW_STATE = "/var/lib/mlflow"  # the mlflow account's (StateDirectory=mlflow)
MLFLOW_ARTIFACTS = f"{MLFLOW_STATE}/artifacts"
MLFLOW_SQLITE = f"{MLFLOW_STATE}/mlflow.db"
MLFLOW_AUTH_DB = f"{MLFLOW_STATE}/basic_auth.db"
# The server's bytecode, compiled by root before its first start and only read by it.
MLFLOW_PYCACHE = f"{STACK_CACHE}/pycache-mlflow"
MLFLOW_CONF_DIR = "/etc/mlflow"
MLFLOW_ENV_FILE = f"{MLFLOW_CONF_DIR}/mlflow.env"
MLFLOW_AUTH_CONFIG = f"{MLFLOW_CONF_DIR}/basic_auth.ini"
MLFLOW_UNIT = "mlflow-server.service"
MLFLOW_ADMIN = "admin"
# Tuning writes its trial runs through this socket: a small service of the mlflow account,
# started on demand, that holds the tracking database's credential (`demo` never does).
RECORDER_SOCKET = "/run/mlflow-recorder.sock"
RECORDER_SOCKET_UNIT = "mlflow-recorder.socket"
RECORDER_UNIT = "mlflow-recorder.service"

# --- backup, restore, safe upgrades, gc (issue #19) ----------------------------------------

# The host side of backup, restore, upgrade and gc (run with the mlflow env's Python).
STACKDATA = f"{MLFLOW_HOME}/stackdata.py"
# Root's: the database dumps a safe upgrade takes before it migrates (the newest few kept).
UPGRADE_BACKUPS = "/var/backups/mlflow-stack"
GC_UNIT = "mlflow-gc.service"  # `mlflow gc` for deleted runs older than gc.older_than
GC_TIMER = "mlflow-gc.timer"
# The env a new MLflow is built in beside the serving one, switched to once migrated.
NEXT_SUFFIX = ".next"

# --- the database server -----------------------------------------------------------------

DATABASES = ("mlflow", "optuna")  # MLflow's tracking store, Optuna's shared studies
DB_USER = "mlflow"  # the tracking server's account: database `mlflow` only
TUNING_DB_USER = "optuna"  # the tuning processes' account: database `optuna` only
# TLS for the tuning workers' connections from other hosts: a CA and a server certificate
# made on the server; the workers get the CA (and check the server's address against it).
DB_TLS_DIR = "/etc/mysql/mlflow-stack-tls"
DB_CA = f"{DB_TLS_DIR}/ca.pem"
DB_CA_ON_WORKERS = "/etc/mlflow-stack/db-ca.pem"


@dataclass(frozen=True)
class DbServer:
    """A database server as a distribution ships it: package, unit, config file, dump tool."""

    name: str  # the `mysql.server` choice naming it
    package: str
    service: str
    conf_file: str  # ours, read after the package's own (the last value wins)
    dump: str
    sockets: tuple[str, ...] = ()  # socket-activation units that bypass port and bind address


MARIADB = DbServer(
    "mariadb",
    "mariadb-server",
    "mariadb.service",
    "/etc/mysql/mariadb.conf.d/60-mlflow-stack.cnf",
    "mariadb-dump",
    ("mariadb.socket",),
)
MYSQL = DbServer(
    "mysql",
    "mysql-server",
    "mysql.service",
    "/etc/mysql/mysql.conf.d/zz-mlflow-stack.cnf",  # after the package's mysqld.cnf
    "mysqldump",
)


def db_server(os_info: OsInfo, choice: str = "auto") -> DbServer:
    """The `mysql.server` choice; `auto`: Ubuntu gets MySQL, Debian (and the rest) MariaDB."""
    if choice == "auto":
        return MYSQL if os_info.family == "ubuntu" else MARIADB
    return MYSQL if choice == "mysql" else MARIADB


def tracking_db_uri(backend: str, password: str, db_port: int) -> str:
    """The MLflow server's backend store URI (it holds the password: 0600 files and stdin)."""
    if backend == "sqlite":
        return f"sqlite:///{MLFLOW_SQLITE}"
    return f"mysql+pymysql://{DB_USER}:{quote(password, safe='')}@127.0.0.1:{db_port}/mlflow"


# --- JupyterLab and the demo -------------------------------------------------------------

DEMO_USER = "demo"
DEMO_ROOT = "/opt/demo"  # root's: the code, the data, setenv.sh, the README; the passwd home
DEMO_CODE = f"{DEMO_ROOT}/demo_wine"
DEMO_DATA = f"{DEMO_CODE}/data/winequality-white.csv"  # shipped with the code
DEMO_SETENV = f"{DEMO_ROOT}/setenv.sh"
DEMO_README = f"{DEMO_ROOT}/README"
DEMO_STATE = "/var/lib/demo"  # the demo account's: HOME of its processes (StateDirectory=demo)
DEMO_WORKSPACE = f"{DEMO_STATE}/workspace"  # Jupyter's root: notebooks, the user's files
DEMO_PYCACHE = f"{DEMO_STATE}/.cache/pycache"
JUPYTER_CONF_DIR = "/etc/jupyter-demo"
JUPYTER_CONFIG = f"{JUPYTER_CONF_DIR}/jupyter_server_config.json"
JUPYTER_UNIT = "jupyter.service"
WARM_UNIT = "demo-wine-warm.service"  # the warm runner `invoke train` forks its runs from
WARM_SOCKET = "/run/demo-wine/warm.sock"
WARM_SOCKET_UNIT = "demo-wine-warm.socket"  # listens for it; starts it when not running

# --- model servers (`invoke serve`) ------------------------------------------------------

MODELS_CONF_DIR = "/etc/mlflow-models"
MODEL_UNIT_TEMPLATE = "mlflow-model@.service"
MODELS_CACHE = "/var/cache/mlflow-models"  # the model servers' HOME (CacheDirectory, demo's)
HOSTSIDE_DIR = "/usr/local/lib/mlflow-stack"  # programs of ours the model servers run


def model_unit(name: str) -> str:
    return f"mlflow-model@{name}.service"


def model_env_file(name: str) -> str:
    return f"{MODELS_CONF_DIR}/{name}.env"


def unit_file(unit: str) -> str:
    return f"/etc/systemd/system/{unit}"


# --- public mode: the HTTPS proxy (role `proxy`) and MLflow's accounts --------------------

PROXY_USER = "caddy"  # the account Debian's caddy package creates
PROXY_STATE = "/var/lib/caddy"  # its home and certificate store (the account's)
PROXY_CONF_DIR = "/etc/mlflow-proxy"  # root's, readable by the proxy account
PROXY_CONFIG = f"{PROXY_CONF_DIR}/Caddyfile"
PROXY_MODELS_DIR = f"{PROXY_CONF_DIR}/models"  # one route per public model (`serve --public`)
PROXY_CA_DIR = f"{PROXY_CONF_DIR}/ca"  # the host's own CA (sites without a domain)
PROXY_CA_CERT = f"{PROXY_CA_DIR}/root.crt"  # what clients pin
PROXY_CA_KEY = f"{PROXY_CA_DIR}/root.key"
PROXY_CA_NAMES = f"{PROXY_CA_DIR}/names"  # the name the CA is constrained to, one line
PROXY_ACME_ROOTS = f"{PROXY_CONF_DIR}/acme-roots.pem"  # a private ACME CA's roots
PROXY_UNIT = "mlflow-proxy.service"
PROXY_PACKAGE_UNIT = "caddy.service"  # the package's own unit (default site on :80): masked
PROXY_ADMIN_SOCKET = "/run/mlflow-proxy/admin.sock"  # Caddy's admin API: root and caddy only
MLFLOW_ADMIN_ENV = f"{MLFLOW_CONF_DIR}/admin.env"  # the bootstrap admin password (0640)
# The MLflow account of the host's own work (train, tune, Jupyter kernels, model servers),
# and the file its credentials are in: root's 0600, read by systemd and root shells only.
MLFLOW_WORKLOAD_USER = "demo"
MLFLOW_CLIENT_ENV = "/etc/mlflow-stack/mlflow-client.env"
# root's: what the last sync of MLflow's accounts applied (a digest and the auth db's inode)
MLFLOW_ACCOUNTS_MARK = "/var/lib/mlflow-stack/mlflow-accounts"


def proxy_model_route(name: str) -> str:
    return f"{PROXY_MODELS_DIR}/{name}.caddy"


def model_token_secret(name: str) -> str:
    """The secret-store name of the bearer token of the public model `name`."""
    return f"model_{name}_token"


@dataclass(frozen=True)
class Layout:
    """The variable part of a host's layout: the Python prefix and the service ports."""

    prefix: str = "/opt/anaconda"
    mlflow_port: int = 5000
    jupyter_port: int = 8888
    db_port: int = 3306
    tracking_host: str = "127.0.0.1"  # where the MLflow server is, seen from this host
    jupyter_base: str = "/"  # Jupyter's base_url: /jupyter/ behind the public proxy
    db_choice: str = "auto"  # the `mysql.server` variable

    @classmethod
    def of(cls, host_vars: HostVars) -> Layout:
        v = host_vars
        base = "/jupyter/" if v.jupyter.public else "/"  # public.JUPYTER_PREFIX
        return cls(
            v.python.prefix,
            v.mlflow.port,
            v.jupyter.port,
            v.mysql.port,
            jupyter_base=base,
            db_choice=v.mysql.server,
        )

    def env(self, name: str) -> str:
        """The directory of the Python env `name`."""
        return env_dir(self.prefix, name)

    def python(self, env: str) -> str:
        return f"{self.env(env)}/bin/python"

    @property
    def demo_python(self) -> str:
        return self.python(DEMO_ENV)

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.tracking_host}:{self.mlflow_port}"

    @property
    def jupyter_url(self) -> str:
        return f"http://127.0.0.1:{self.jupyter_port}{self.jupyter_base.rstrip('/')}"
