"""Role `mlflow_server`: the MLflow tracking server as a hardened systemd unit.

The backend URI (with the database password) lives only in a 0600 env file. On MariaDB an
empty database gets its schema from a snapshot of the one MLflow builds (`schema-mariadb.sql`);
elsewhere the server's first start creates it. An older schema is migrated explicitly
(`db_upgrade.py`) before the restart, which MLflow would refuse. The unit runs
`tracking_server.py`, MLflow's app under uvicorn in one process; the run ends when /health
answers (a wait left to the end of the run, so the next roles proceed while MLflow starts).
"""

from __future__ import annotations

from mlflow_stack import hostside, layout, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    Directory,
    File,
    Run,
    Schedule,
    Service,
    Step,
    WaitHttp,
    q,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import (
    MLFLOW_ARTIFACTS,
    MLFLOW_CONF_DIR,
    MLFLOW_ENV_FILE,
    MLFLOW_PYCACHE,
    MLFLOW_UNIT,
    MLFLOW_USER,
)
from mlflow_stack.sizing import Sizing
from roles import mlflow_auth, mysql
from roles.accounts import mlflow_account

# Alembic head of the pinned mlflow (3.17.2); tests check it against the installed mlflow.
SCHEMA_HEAD = "dc11669786a5"
SNAPSHOT = hostside.HERE / "schema-mariadb.sql"  # that head, as MLflow builds it
LOADING = "mlflow_stack_schema_loading"  # table marking a snapshot load not finished yet
WARM_ID = "mlflow_server:bytecode"
RECORDER_IDLE_S, RECORDER_IDLE_S_SMALL = 120, 15
# What the launcher imports before it serves (anything else still compiles at the first start).
WARM_IMPORTS = (
    "uvicorn",
    "pymysql",
    "mlflow.server.handlers",
    "mlflow.server.fastapi_app",
    "mlflow.tracing.trace_rollup_service",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)
TABLES_QUERY = role_facts.TABLES_QUERY


def schema_fact(backend: str) -> F.Fact:
    """The schema revision recorded in the tracking database (empty when none); live, so a
    database the run has just started or created is read again before the schema step."""
    return role_facts.MlflowSchema(backend)


def tables_fact() -> F.Fact:
    """Tables of the tracking database (live: the mysql role creates it in the same run)."""
    return role_facts.MlflowTables()


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


def warm_bytecode_step(env_prefix: str, env_synced: str) -> Run:
    """Compile what the server imports into its bytecode cache, in the background: the
    `anaconda` role starts it once the env is synced (step id `env_synced`), so it runs while
    MariaDB installs and the server's first start only imports. The cache is root's (root
    writes it, the server only reads it): no account can plant bytecode root would run."""
    cache = F.PathState(MLFLOW_PYCACHE)
    imports = q("import " + ", ".join(WARM_IMPORTS))
    return Run(
        "bytecode of the MLflow server",
        f"install -d -m 0755 {layout.STACK_CACHE} {MLFLOW_PYCACHE} && cd / && "
        f"PYTHONPYCACHEPREFIX={MLFLOW_PYCACHE} {env_prefix}/bin/python -W ignore -c {imports}",
        when=lambda c: c[cache] is None or env_synced in c.changed,
        needs=(cache,),
        schedule=Schedule.BACKGROUND,
        timeout=900,
        id=WARM_ID,
    )


def needs_migration(version: str) -> bool:
    """An existing schema older than the pinned MLflow's (an empty one the server creates)."""
    return version.strip() not in ("", SCHEMA_HEAD)


def allowed_hosts(ctx: RoleContext) -> list[str]:
    """The Host headers MLflow answers (else 403). Unset, MLflow allows loopback and the
    private ranges (its tuning workers too); opened to the network, the host's names, and
    loopback on any port (`invoke tunnel`'s local ports)."""
    mv = ctx.vars.mlflow
    if not mv.public:
        return list(mv.allowed_hosts)
    return mlflow_auth.allowed_hosts(ctx)  # public: the proxy's site name(s) and loopback


def listen_on(ctx: RoleContext) -> list[str]:
    """Loopback (public or not: the proxy is what the network reaches), and the private
    address its tuning workers reach it at (they record their trial runs through its REST
    API)."""
    return ["127.0.0.1", *([ctx.private_address] if ctx.workers else [])]


def recorder_steps(env_prefix: str, sizing: Sizing) -> list[Step]:
    """The record service tuning writes its trial runs through (as this account, which holds
    the database's credential), started by its socket when a client connects; it exits when
    idle (soon on the small profile, where its memory is wanted back)."""
    socket_unit = render("systemd/mlflow-recorder.socket.j2", socket=layout.RECORDER_SOCKET)
    service_unit = render(
        "systemd/mlflow-recorder.service.j2",
        user=MLFLOW_USER,
        state=layout.MLFLOW_STATE,
        env_file=MLFLOW_ENV_FILE,
        env_prefix=env_prefix,
        code_root=layout.DEMO_ROOT,
        pycache=MLFLOW_PYCACHE,
        allow=layout.DEMO_USER,
        idle=RECORDER_IDLE_S_SMALL if sizing.small else RECORDER_IDLE_S,
        malloc_arenas=sizing.malloc_arenas,
    )
    units = (layout.RECORDER_SOCKET_UNIT, layout.RECORDER_UNIT)
    return [
        File(layout.unit_file(layout.RECORDER_UNIT), service_unit, unit_file=True),
        File(
            layout.unit_file(layout.RECORDER_SOCKET_UNIT),
            socket_unit,
            notify=(layout.RECORDER_SOCKET_UNIT,),
            unit_file=True,
        ),
        Service(units[0]),
    ]


def build(ctx: RoleContext) -> list[Step]:
    mv = ctx.vars.mlflow
    env_prefix = layout.env_dir(ctx.vars.python.prefix, layout.MLFLOW_ENV)
    uses_mysql = mv.backend == "mysql"
    password = ctx.secret("db_password", env=mysql.PASSWORD_ENV) if uses_mysql else None
    env_vars = {
        "backend_uri": layout.tracking_db_uri(
            mv.backend, password.reveal() if password else "", ctx.vars.mysql.port
        ),
        "public": mv.public,
    }
    user = MLFLOW_USER
    steps: list[Step] = [
        *mlflow_account(),
        Directory(MLFLOW_CONF_DIR, "root", user, 0o750),
    ]
    # --- public mode: MLflow's basic-auth app behind the proxy (roles/mlflow_auth.py) ---
    if mv.public:
        auth_steps, auth_env = mlflow_auth.config_steps(ctx)
        steps += auth_steps
        env_vars.update(auth_env)
    # ---
    schema = schema_fact(mv.backend)
    unit = render(
        "systemd/mlflow-server.service.j2",
        user=user,
        state=layout.MLFLOW_STATE,
        pycache=MLFLOW_PYCACHE,
        launcher=layout.MLFLOW_LAUNCHER,
        env_file=MLFLOW_ENV_FILE,
        env_prefix=env_prefix,
        binds=listen_on(ctx),
        workers=ctx.workers,
        port=mv.port,
        uvicorn_workers=ctx.sizing.tracking_workers(mv.workers),
        artifacts=MLFLOW_ARTIFACTS,
        allowed_hosts=allowed_hosts(ctx),
        cors_origins=mlflow_auth.cors_origins(ctx) if mv.public else [],
        admin_env=layout.MLFLOW_ADMIN_ENV,
        public=mv.public,
        malloc_arenas=ctx.sizing.malloc_arenas,
        db_unit=layout.db_server(ctx.os, ctx.vars.mysql.server).service if uses_mysql else "",
    )
    snapshot: list[Step] = []
    if uses_mysql and layout.db_server(ctx.os, ctx.vars.mysql.server) == layout.MARIADB:
        tables = tables_fact()
        snapshot.append(
            Run(
                f"tracking schema {SCHEMA_HEAD} (snapshot)",
                load_snapshot_script(),
                when=lambda c: loads_snapshot(c[tables]),
                needs=(tables,),
                stdin=snapshot_sql(SNAPSHOT.read_text()),
                timeout=300,
                notify=(MLFLOW_UNIT,),
            )
        )
    steps += [
        File(
            MLFLOW_ENV_FILE,
            render("mlflow/mlflow.env.j2", auth_config=layout.MLFLOW_AUTH_CONFIG, **env_vars),
            "root",
            user,
            0o640,
            secret=True,
            notify=(MLFLOW_UNIT,),
        ),
        File(layout.MLFLOW_DB_UPGRADE, hostside.read("db_upgrade.py"), "root", "root", 0o644),
        File(
            layout.MLFLOW_LAUNCHER,
            hostside.read("tracking_server.py"),
            "root",
            "root",
            0o644,
            notify=(MLFLOW_UNIT,),
        ),
        *snapshot,
        Run(
            "migrate tracking schema",
            f"PYTHONPYCACHEPREFIX={MLFLOW_PYCACHE} "
            f"{env_prefix}/bin/python {layout.MLFLOW_DB_UPGRADE} {MLFLOW_ENV_FILE}",
            when=lambda c: needs_migration(c[schema].output),
            needs=(schema,),
            user=user,
            notify=(MLFLOW_UNIT,),
        ),
        File(layout.unit_file(MLFLOW_UNIT), unit, notify=(MLFLOW_UNIT,), unit_file=True),
        Service(MLFLOW_UNIT),
        *recorder_steps(env_prefix, ctx.sizing),
        # public mode: the admin's password and the workload account, through MLflow's API
        *(mlflow_auth.account_steps(ctx) if mv.public else mlflow_auth.off_steps()),
        WaitHttp(
            "mlflow answers /health",
            f"http://127.0.0.1:{mv.port}/health",
            timeout=300,  # a first start creates the schema
            after=(MLFLOW_UNIT,),
            schedule=Schedule.AT_END,
        ),
    ]
    return steps


role = Role("mlflow_server", build)
