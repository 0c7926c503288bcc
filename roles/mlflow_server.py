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
    Apt,
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
PINNED = "3.17.2"
# Heads of the MLflow versions an env may be pinned to instead (python.requirements, for
# upgrade tests): 2.22.5 is the last 2.x; 3.0 and 3.1 share theirs.
SCHEMA_HEADS = {
    PINNED: SCHEMA_HEAD,
    "3.1.4": "bda7b8c39065",
    "3.0.1": "bda7b8c39065",
    "2.22.5": "0584bdc529eb",
}
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
ADMIN_SECRET = "mlflow_admin_password"
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
    imports = q(warm_code())
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


def warm_code() -> str:
    """Python importing what the server imports (a module another MLflow lacks is skipped)."""
    return (
        "import importlib\n"
        f"for name in {WARM_IMPORTS!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        pass"
    )


def needs_migration(version: str, head: str = SCHEMA_HEAD) -> bool:
    """An existing schema other than the wanted MLflow's (an empty one the server creates)."""
    return version.strip() not in ("", head)


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
    from roles import anaconda

    mv = ctx.vars.mlflow
    env_prefix = layout.env_dir(ctx.vars.python.prefix, layout.MLFLOW_ENV)
    version = anaconda.mlflow_version(anaconda.requirements_for(ctx, layout.MLFLOW_ENV))
    pinned = version in ("", PINNED)  # conda's environment file pins no exact version
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
    admin_checked: list[Step] = []
    if mv.public:
        auth_steps, auth_env = mlflow_auth.config_steps(ctx)
        steps += auth_steps
        env_vars.update(auth_env)
        admin_checked = admin_steps(env_prefix, f"file:{layout.secret_path(ADMIN_SECRET)}")
    # ---
    schema = schema_fact(mv.backend)
    binds = listen_on(ctx)
    if not pinned and len(binds) > 1:  # `mlflow server` takes one --host (the unit's
        binds = ["0.0.0.0"]  # IPAddressAllow= still admits only loopback and the workers)
    unit = render(
        "systemd/mlflow-server.service.j2",
        user=user,
        state=layout.MLFLOW_STATE,
        pycache=MLFLOW_PYCACHE,
        env_file=MLFLOW_ENV_FILE,
        env_prefix=env_prefix,
        # another MLflow than the pinned one (an upgrade test's) runs as `mlflow server`
        launcher=layout.MLFLOW_LAUNCHER if pinned else "-m mlflow server",
        binds=binds,
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
    if uses_mysql and layout.db_server(ctx.os, ctx.vars.mysql.server) == layout.MARIADB and pinned:
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
        *data_steps(ctx, env_prefix, schema, version),
        *admin_checked,
        File(layout.unit_file(MLFLOW_UNIT), unit, notify=(MLFLOW_UNIT,), unit_file=True),
        Service(MLFLOW_UNIT),
        *recorder_steps(env_prefix, ctx.sizing),
        # public mode: the admin's password and the workload account, through MLflow's API
        *(mlflow_auth.account_steps(ctx) if mv.public else mlflow_auth.off_steps()),
        *gc_steps(ctx, env_prefix),
        WaitHttp(
            "mlflow answers /health",
            f"http://127.0.0.1:{mv.port}/health",
            timeout=300,  # a first start creates the schema
            after=(MLFLOW_UNIT,),
            schedule=Schedule.AT_END,
        ),
    ]
    return steps


# --- backup, safe upgrades, gc (issue #19) ----------------------------------------------

UPGRADE_ID = "mlflow_server:upgrade"


def zstd_step() -> Apt:
    """zstd, which backups compress with: installed in the background (MariaDB's install is
    over by this role's turn, so it never waits for dpkg's lock nor holds the early one up)."""
    return Apt(("zstd",), schedule=Schedule.BACKGROUND, exclusive="")


def upgrade_script(env_prefix: str, beside: str | None, port: int = 5000) -> str:
    """`stackdata.py upgrade`, as root: lock, back up, migrate with the MLflow that will
    serve, put the backup back if that fails, switch envs only if it worked."""
    args = f"upgrade --env {q(env_prefix)} --port {port} --warm {q(warm_code())}"
    if beside:
        args += f" --next {q(beside)}"
    return f"cd / && {env_prefix}/bin/python -I {layout.STACKDATA} {args}"


def data_steps(ctx: RoleContext, env_prefix: str, schema: F.Fact, version: str) -> list[Step]:
    """The host program of backup, restore, upgrade and gc; the schema brought to the MLflow
    that serves: a new mlflow env (built beside by the anaconda role) is switched to only
    once the database was backed up and migrated with it, so a failed migration puts the
    backup back and leaves the previous MLflow serving. The auth database's migrations go
    with it. Replaces the plain `db_upgrade.py` step (the backup comes first now)."""
    from roles import anaconda

    prefix = ctx.vars.python.prefix
    text = anaconda.requirements_for(ctx, layout.MLFLOW_ENV)
    beside = anaconda.next_env(prefix)
    next_stamp = anaconda.next_stamp_fact(prefix)
    head = SCHEMA_HEADS.get(version or PINNED)

    def next_ready(c) -> bool:
        return anaconda.NEXT_ENV_ID in c.changed or anaconda.env_is_current(c[next_stamp], text)

    def wanted(c) -> bool:
        return next_ready(c) or (head is not None and needs_migration(c[schema].output, head))

    notify = (MLFLOW_UNIT, layout.RECORDER_SOCKET_UNIT)
    if ctx.vars.gc.older_than:
        notify += (layout.GC_TIMER,)
    zstd = zstd_step()
    return [
        zstd,
        File(layout.STACKDATA, hostside.read("stackdata.py"), "root", "root", 0o644),
        Run(
            "MLflow schema and env: back up, migrate, switch",
            lambda c: upgrade_script(
                env_prefix, beside if next_ready(c) else None, ctx.vars.mlflow.port
            ),
            when=wanted,
            needs=(schema, next_stamp),
            notify=notify,
            waits_for=(zstd.id,),
            timeout=3600,
            id=UPGRADE_ID,
        ),
    ]


def gc_steps(ctx: RoleContext, env_prefix: str) -> list[Step]:
    """`mlflow gc` on a timer (gc.older_than, gc.on_calendar), as the mlflow account; off
    (timer stopped and disabled) when gc.older_than is empty."""
    gv, mv = ctx.vars.gc, ctx.vars.mlflow
    enabled = bool(gv.older_than)
    service = render(
        "systemd/mlflow-gc.service.j2",
        user=MLFLOW_USER,
        state=layout.MLFLOW_STATE,
        env_file=MLFLOW_ENV_FILE,
        pycache=MLFLOW_PYCACHE,
        env_prefix=env_prefix,
        program=layout.STACKDATA,
        older_than=gv.older_than or "30d",
        port=mv.port,
        artifacts=MLFLOW_ARTIFACTS,
        public=mv.public,
        admin_secret=layout.secret_path("mlflow_admin_password"),
    )
    timer = render("systemd/mlflow-gc.timer.j2", on_calendar=gv.on_calendar)
    notify = (layout.GC_TIMER,) if enabled else ()
    return [
        File(layout.unit_file(layout.GC_UNIT), service, unit_file=True),
        File(layout.unit_file(layout.GC_TIMER), timer, notify=notify, unit_file=True),
        Service(layout.GC_TIMER, enabled=enabled, running=enabled),
    ]


def admin_steps(env_prefix: str, secret_step: str) -> list[Step]:
    """Public mode: the auth database's admin password is the host's secret, also when a
    restore brought another host's users before this host had a secret (the API cannot log
    in then). Written straight into the database, so MLflow restarts after it: its auth app
    caches good credentials, and an old password must not stay valid."""
    state = role_facts.AuthAdmin(env_prefix)
    return [
        Run(
            "MLflow admin password is the secret's",
            f"cd / && {q(env_prefix)}/bin/python -I {layout.STACKDATA} auth-admin --set",
            when=lambda c: (
                (c[state].ok and c[state].output.strip() == "differs") or secret_step in c.changed
            ),
            needs=(state,),
            notify=(MLFLOW_UNIT,),
        )
    ]


role = Role("mlflow_server", build)
