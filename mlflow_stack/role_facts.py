"""The facts the roles read beyond the engine's generic ones, as classes rebuilt from their key.

Each was an ad-hoc `Shell` snippet built inside a role; as a `Fact` kind of its own its
command is a function of its key, so the probe plan a run saves (keys only, see
`engine.probing`) rebuilds it from this code on the next run. Light on purpose (no role,
step or template imports): the prefetch imports it before the roles. They parse like `Shell`
(a `ShellResult`: exit code and output), so the roles read them as before.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import ClassVar

from mlflow_stack import inputs, layout
from mlflow_stack.engine import facts as F

KINDS = F.KINDS  # every kind a plan may name, these included
STAMP = ".mlflow-stack-requirements.sha256"  # an env's requirements hash after its last sync
TABLES_QUERY = "SELECT table_name FROM information_schema.tables WHERE table_schema='mlflow'"
STATE_QUERY = (
    "SELECT 'user', User, Host, plugin, HEX(IFNULL(authentication_string, '')), ssl_type "
    "FROM mysql.user; "
    "SELECT 'db', schema_name, default_character_set_name, default_collation_name "
    "FROM information_schema.schemata; "
    "SELECT 'dbpriv', grantee, table_schema, privilege_type "
    "FROM information_schema.schema_privileges; "
    "SELECT 'globalpriv', grantee, privilege_type FROM information_schema.user_privileges "
    "WHERE privilege_type <> 'USAGE';"
)
q = shlex.quote


@dataclass(frozen=True)
class _Script(F.Fact):
    """A read-only snippet whose exit code and output the role reads (like `F.Shell`)."""

    def parse(self, output: str, rc: int) -> F.ShellResult:
        return F.ShellResult(rc=rc, output=output)


@dataclass(frozen=True)
class EnvStamp(_Script):
    """The requirements hash an env recorded after its last successful sync."""

    path: str  # the env's directory
    kind: ClassVar[str] = "env-stamp"

    def check(self) -> None:
        F.checked_path(self.path)

    def command(self) -> str:
        return f"[ -x {q(self.path)}/bin/python ] && cat {q(self.path)}/{STAMP}"


@dataclass(frozen=True)
class UvVersion(_Script):
    prefix: str
    kind: ClassVar[str] = "uv-version"

    def check(self) -> None:
        F.checked_path(self.prefix)

    def command(self) -> str:
        return f"{q(self.prefix)}/bin/uv --version"


@dataclass(frozen=True)
class CondaEnvs(_Script):
    prefix: str
    kind: ClassVar[str] = "conda-envs"

    def check(self) -> None:
        F.checked_path(self.prefix)

    def command(self) -> str:
        return f"{q(self.prefix)}/bin/conda env list --json"


@dataclass(frozen=True)
class JupyterConfig(_Script):
    kind: ClassVar[str] = "jupyter-config"

    def command(self) -> str:
        return f"cat {q(layout.JUPYTER_CONFIG)}"


@dataclass(frozen=True)
class MlflowSchema(_Script):
    """The schema revision recorded in the tracking database (empty when none); live, so a
    database the run has just started or created is read again before the schema step."""

    backend: str
    kind: ClassVar[str] = "mlflow-schema"
    live: ClassVar[bool] = True

    def check(self) -> None:
        if self.backend not in ("mysql", "sqlite"):
            raise ValueError("backend mysql or sqlite")

    def command(self) -> str:
        if self.backend == "sqlite":
            read = (
                f"import sqlite3; c = sqlite3.connect('file:{layout.MLFLOW_SQLITE}?mode=ro', "
                "uri=True); print(c.execute('select version_num from alembic_version')"
                ".fetchone()[0])"
            )
            # as the server's account: root reads nothing in a tree another account can write
            return f"runuser -u {layout.MLFLOW_USER} -- python3 -c {q(read)}"
        return 'mysql -N -B -e "SELECT version_num FROM mlflow.alembic_version"'


@dataclass(frozen=True)
class MlflowTables(_Script):
    """Tables of the tracking database (live: the mysql role creates it in the same run)."""

    kind: ClassVar[str] = "mlflow-tables"
    live: ClassVar[bool] = True

    def command(self) -> str:
        return f'mysql -N -B -e "{TABLES_QUERY}"'


@dataclass(frozen=True)
class AuthAdmin(_Script):
    """Public mode: "differs" when the auth database's admin password is not the host's
    secret (a restore brought another host's users), as `stackdata.py` of the env checks it."""

    env: str  # the mlflow env's directory
    kind: ClassVar[str] = "auth-admin"

    def check(self) -> None:
        F.checked_path(self.env)

    def command(self) -> str:
        return f"cd / && {q(self.env)}/bin/python -I {layout.STACKDATA} auth-admin --check"


@dataclass(frozen=True)
class MysqlState(_Script):
    """Users, databases and grants, read from the running server (again after a change: the
    server may have been stopped, or reinstalled over old data, when the run began)."""

    kind: ClassVar[str] = "mysql-state"
    live: ClassVar[bool] = True

    def command(self) -> str:
        return f'mysql -N -B -e "{STATE_QUERY}"'


@dataclass(frozen=True)
class DbCertificate(_Script):
    """The subjectAltName of the database's TLS certificate (for the tuning workers)."""

    kind: ClassVar[str] = "db-certificate"

    def command(self) -> str:
        cert = q(f"{layout.DB_TLS_DIR}/server-cert.pem")
        return f"openssl x509 -in {cert} -noout -ext subjectAltName"


# --- public mode -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowAccounts(_Script):
    """`<digest> <inode>` of the last sync of MLflow's accounts, then the auth database's
    inode now. Live: read again after MLflow's restart (its first start in public mode
    creates the database)."""

    kind: ClassVar[str] = "mlflow-accounts"
    live: ClassVar[bool] = True

    def command(self) -> str:
        return (
            f"cat {layout.MLFLOW_ACCOUNTS_MARK} 2>/dev/null || echo none; "
            f"stat -c %i {layout.MLFLOW_AUTH_DB} 2>/dev/null || echo none"
        )


@dataclass(frozen=True)
class ProxyCa(_Script):
    """The name the host's CA is constrained to (fails when there is no complete CA)."""

    kind: ClassVar[str] = "proxy-ca"

    def command(self) -> str:
        return (
            f"test -s {layout.PROXY_CA_CERT} && test -s {layout.PROXY_CA_KEY} && "
            f"cat {layout.PROXY_CA_NAMES}"
        )


_RESOLVE = re.compile(r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):\d{1,5}:127\.0\.0\.1$")


@dataclass(frozen=True)
class ProxyAnswers(_Script):
    """The HTTP status the proxy answers for its site on this host (`000`: none), the
    certificate verified against `cafile` (or the system's roots when empty). Live: the proxy
    may have started or reloaded in this run."""

    url: str  # the site's https URL
    resolve: str  # curl's --resolve entry: the site's name and port to 127.0.0.1
    cafile: str = ""
    kind: ClassVar[str] = "proxy-answers"
    live: ClassVar[bool] = True

    def check(self) -> None:
        inputs.url(self.url, "url", schemes=("https",))
        if not _RESOLVE.match(self.resolve):
            raise ValueError("resolve: name:port:127.0.0.1")
        if self.cafile:
            F.checked_path(self.cafile)

    def command(self) -> str:
        cacert = f"--cacert {q(self.cafile)} " if self.cafile else ""
        return (
            f"curl -s -o /dev/null -m 3 -w '%{{http_code}}' {cacert}"
            f"--resolve {q(self.resolve)} {q(self.url)}"
        )
