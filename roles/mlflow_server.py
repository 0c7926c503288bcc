"""Role `mlflow_server`: the MLflow tracking server as a hardened systemd unit.

The backend URI (with the database password) lives only in a 0600 env file. On MariaDB an empty
database gets its schema from a snapshot of the one MLflow builds (`schema-mariadb.sql`, loaded
in under a second; MLflow's own create-and-migrate at the server's first start takes 6-15 s);
elsewhere the server's first start creates it. An older schema is migrated explicitly
(`db_upgrade.py`) before the restart, which MLflow would refuse. The unit runs `server.py`,
which serves MLflow's app with uvicorn in one process (`mlflow server` would start a second
one); the run ends when /health answers (the wait is deferred to the end of the run so that
the next roles proceed while MLflow starts).
"""

from __future__ import annotations

from urllib.parse import quote

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.runner import Role
from mlflow_stack.engine.steps import (
    Directory,
    File,
    Run,
    Service,
    Step,
    SystemUser,
    WaitHttp,
    q,
)
from mlflow_stack.engine.templating import TEMPLATES_DIR, render
from roles import mysql

USER = "mlflow"
HOME = "/opt/mlflow"
ARTIFACTS = f"{HOME}/artifacts"
CONF_DIR = "/etc/mlflow"
ENV_FILE = f"{CONF_DIR}/mlflow.env"
UNIT = "mlflow-server.service"
SQLITE_PATH = f"{HOME}/mlflow.db"
# Alembic head of the pinned mlflow (3.17.2); tests check it against the installed mlflow.
SCHEMA_HEAD = "dc11669786a5"
SNAPSHOT = TEMPLATES_DIR / "mlflow" / "schema-mariadb.sql"  # that head, as MLflow builds it
LOADING = "mlflow_stack_schema_loading"  # table marking a snapshot load not finished yet
PYCACHE = f"{HOME}/.cache/pycache"  # the unit's PYTHONPYCACHEPREFIX
WARM = "bytecode of the MLflow server"
# What server.py imports before it serves (anything else still compiles at the first start).
WARM_IMPORTS = (
    "uvicorn",
    "pymysql",
    "mlflow.server.handlers",
    "mlflow.server.fastapi_app",
    "mlflow.tracing.trace_rollup_service",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)
TABLES_QUERY = "SELECT table_name FROM information_schema.tables WHERE table_schema='mlflow'"


def backend_uri(backend: str, password: str, port: int) -> str:
    if backend == "sqlite":
        return f"sqlite:///{SQLITE_PATH}"
    return f"mysql+pymysql://{mysql.DB_USER}:{quote(password, safe='')}@127.0.0.1:{port}/mlflow"


def schema_fact(backend: str) -> F.Shell:
    """The schema revision recorded in the tracking database (empty when none); live, so a
    database the run has just started or created is read again before the schema step."""
    if backend == "sqlite":
        read = (
            "import sqlite3; c = sqlite3.connect('file:" + SQLITE_PATH + "?mode=ro', uri=True); "
            "print(c.execute('select version_num from alembic_version').fetchone()[0])"
        )
        return F.LiveShell("mlflow schema", f"python3 -c {q(read)}")
    return F.LiveShell(
        "mlflow schema", 'mysql -N -B -e "SELECT version_num FROM mlflow.alembic_version"'
    )


def tables_fact() -> F.Shell:
    """Tables of the tracking database (live: the mysql role creates it in the same run)."""
    return F.LiveShell("mlflow tables", f'mysql -N -B -e "{TABLES_QUERY}"')


def loads_snapshot(tables: F.ShellResult) -> bool:
    """An empty tracking database, or one a killed load left behind (its marker table), gets
    the snapshot; a database that cannot be read yet too (the load then says why it fails)."""
    names = tables.output.split()
    return not tables.ok or not names or LOADING in names


def load_snapshot_script() -> str:
    """Load the snapshot (SQL on stdin) into the `mlflow` database: a load a killed run left
    half-done (marker table present) is dropped first; any other table there is left alone."""
    spec = f"CHARACTER SET {mysql.CHARSET} COLLATE {mysql.COLLATION}"
    return (
        f'set -e; tables=$(mysql -N -B -e "{TABLES_QUERY}"); '
        'case " $(echo $tables) " in "  ") ;; '
        f'*" {LOADING} "*) mysql -e "DROP DATABASE mlflow; CREATE DATABASE mlflow {spec}";; '
        '*) echo "database mlflow has tables but no MLflow schema version; not loading the '
        'schema over them" >&2; exit 1;; esac; '
        "mysql --batch mlflow"
    )


def snapshot_sql(snapshot: str, head: str = SCHEMA_HEAD) -> str:
    """The load: marker table first, the schema, its alembic revision, the marker dropped."""
    return (
        f"SET FOREIGN_KEY_CHECKS=0;\nCREATE TABLE {LOADING} (loading INT);\n{snapshot}\n"
        f"INSERT INTO alembic_version VALUES ('{head}');\nDROP TABLE {LOADING};\n"
    )


def warm_bytecode_step(env_prefix: str) -> Run:
    """Compile what the server imports into its bytecode cache, in the background: the
    `anaconda` role starts it once the env is synced, so it runs while MariaDB installs and
    the server's first start only imports. As root (the mlflow user comes later): this role
    hands the cache over (`cache_owner_step`)."""
    cache = F.PathState(PYCACHE)
    imports = q("import " + ", ".join(WARM_IMPORTS))
    return Run(
        WARM,
        f"mkdir -p {PYCACHE} && cd / && "
        f"PYTHONPYCACHEPREFIX={PYCACHE} {env_prefix}/bin/python -W ignore -c {imports}",
        when=lambda c: c[cache] is None or "env mlflow" in c.changed,
        needs=(cache,),
        background=True,
        timeout=900,
    )


def cache_owner_step() -> Run:
    """The bytecode cache belongs to the mlflow user (after the warm-up, which runs as root)."""
    cache = f"{HOME}/.cache"
    foreign = F.Shell(
        "mlflow cache owner",
        f"[ ! -e {cache} ] || find {cache} ! -user {USER} -print -quit 2>/dev/null || echo ?",
    )
    return Run(
        f"bytecode cache owned by {USER}",
        f"[ ! -e {cache} ] || chown -R {USER}:{USER} {cache}",
        when=lambda c: WARM in c.changed or bool(c[foreign].output.strip()),
        needs=(foreign,),
        waits_for=(WARM,),
    )


def needs_migration(version: str) -> bool:
    """An existing schema older than the pinned MLflow's (an empty one the server creates)."""
    return version.strip() not in ("", SCHEMA_HEAD)


def allowed_hosts(ctx: RoleContext) -> list[str]:
    mv = ctx.vars.mlflow
    if not mv.public:
        return list(mv.allowed_hosts)
    names = mv.allowed_hosts or [n for n in (ctx.address, ctx.host) if n]
    names = [*names, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(h for n in names for h in (n, f"{n}:{mv.port}")))


def build(ctx: RoleContext) -> list[Step]:
    mv = ctx.vars.mlflow
    env_prefix = f"{ctx.vars.python.prefix}/envs/mlflow"
    uses_mysql = mv.backend == "mysql"
    password = ctx.secret("db_password", env=mysql.PASSWORD_ENV) if uses_mysql else None
    env_vars = {
        "backend_uri": backend_uri(
            mv.backend, password.reveal() if password else "", ctx.vars.mysql.port
        ),
        "public": mv.public,
    }
    steps: list[Step] = [
        SystemUser(USER, home=HOME),
        Directory(HOME, USER, USER, 0o750),
        Directory(ARTIFACTS, USER, USER, 0o750),
        Directory(CONF_DIR, "root", USER, 0o750),
        cache_owner_step(),
    ]
    if mv.public:
        admin = ctx.secret("mlflow_admin_password", env="MLFLOW_ADMIN_PASSWORD")
        env_vars["flask_secret_key"] = ctx.secret("mlflow_flask_secret_key").reveal()
        steps += ctx.secret_steps(
            "mlflow_admin_password",
            "mlflow_flask_secret_key",
            env={"mlflow_admin_password": "MLFLOW_ADMIN_PASSWORD"},
        )
        auth = render(
            "mlflow/basic_auth.ini.j2", home=HOME, admin_user="admin", admin_password=admin.reveal()
        )
        steps.append(
            File(f"{CONF_DIR}/basic_auth.ini", auth, USER, USER, 0o600, secret=True, notify=(UNIT,))
        )
    schema = schema_fact(mv.backend)
    unit = render(
        "systemd/mlflow-server.service.j2",
        user=USER,
        home=HOME,
        env_file=ENV_FILE,
        env_prefix=env_prefix,
        bind="0.0.0.0" if mv.public else "127.0.0.1",
        port=mv.port,
        workers=mv.workers,
        artifacts=ARTIFACTS,
        allowed_hosts=allowed_hosts(ctx),
        public=mv.public,
        db_unit=mysql.flavor(ctx.os).service if uses_mysql else "",
    )
    upgrade = (TEMPLATES_DIR / "mlflow" / "db_upgrade.py").read_text()
    launcher = (TEMPLATES_DIR / "mlflow" / "server.py").read_text()
    snapshot: list[Step] = []
    if uses_mysql and mysql.flavor(ctx.os) == mysql.MARIADB:
        tables = tables_fact()
        snapshot.append(
            Run(
                f"tracking schema {SCHEMA_HEAD} (snapshot)",
                load_snapshot_script(),
                when=lambda c: loads_snapshot(c[tables]),
                needs=(tables,),
                stdin=snapshot_sql(SNAPSHOT.read_text()),
                timeout=300,
                notify=(UNIT,),
            )
        )
    steps += [
        File(
            ENV_FILE,
            render("mlflow/mlflow.env.j2", **env_vars),
            USER,
            USER,
            0o600,
            secret=True,
            notify=(UNIT,),
        ),
        File(f"{HOME}/db_upgrade.py", upgrade, "root", USER, 0o640),
        File(f"{HOME}/server.py", launcher, "root", USER, 0o640, notify=(UNIT,)),
        *snapshot,
        Run(
            "migrate tracking schema",
            f"PYTHONPYCACHEPREFIX={HOME}/.cache/pycache "
            f"{env_prefix}/bin/python {HOME}/db_upgrade.py {ENV_FILE}",
            when=lambda c: needs_migration(c[schema].output),
            needs=(schema,),
            user=USER,
            notify=(UNIT,),
        ),
        File(f"/etc/systemd/system/{UNIT}", unit, notify=(UNIT,), unit_file=True),
        Service(UNIT),
        # Deferred: the next roles run while MLflow starts; the run ends when /health answers.
        WaitHttp(
            "mlflow answers /health",
            f"http://127.0.0.1:{mv.port}/health",
            timeout=300,  # a first start creates the schema
            after=(UNIT,),
            defer=True,
        ),
    ]
    return steps


role = Role("mlflow_server", build)
