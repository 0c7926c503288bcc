"""MLflow's accounts in public mode (not a role: the `mlflow_server` role's public part).

With `mlflow.public`, MLflow runs its basic-auth app behind the proxy:
* no self sign-up: in MLflow 3.17 only an admin creates users (`invoke users.add`);
* `default_permission` READ (`public.default_permission`): on a team's demo host everyone
  browses every experiment and model, while writing needs a grant or ownership (a creator
  manages what it creates). NO_PERMISSIONS would make each user see only what was shared.
* the admin's password comes from the secret store (`mlflow_admin_password`, or
  `MLFLOW_ADMIN_PASSWORD`). MLflow reads a configured admin password only when it first
  creates the admin, so a changed one is applied through MLflow's API (the old one is kept as
  `mlflow_admin_password_previous` until the change is made);
* the host's own work (train, tune, Jupyter kernels, model servers) logs in as the non-admin
  account `demo`, whose credentials are in a root-only env file that systemd and root shells
  read (`/etc/mlflow-stack/mlflow-client.env`): a Jupyter user can use MLflow, not manage
  its accounts.
The auth database stays in the server's state directory (`/var/lib/mlflow/basic_auth.db`),
next to the SQLite store and the artifacts, where backups and upgrades look.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow_stack import hostside, layout, public, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext, secret_file
from mlflow_stack.engine.steps import Directory, File, Run, Step
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import (
    MLFLOW_ADMIN,
    MLFLOW_CLIENT_ENV,
    MLFLOW_UNIT,
    MLFLOW_USER,
    MLFLOW_WORKLOAD_USER,
)

ADMIN_SECRET = "mlflow_admin_password"
ADMIN_PREVIOUS = "mlflow_admin_password_previous"
ADMIN_ENV = "MLFLOW_ADMIN_PASSWORD"
WORKLOAD_SECRET = "mlflow_workload_password"
FLASK_SECRET = "mlflow_flask_secret_key"
ACCOUNTS_SCRIPT = f"{layout.HOSTSIDE_DIR}/mlflow_accounts.py"


def cors_origins(ctx: RoleContext) -> list[str]:
    """Origins whose browser requests MLflow accepts: the public site (and extra names)."""
    site = public.site(ctx.vars, ctx.address)
    extra = [f"https://{n}" for n in ctx.vars.mlflow.allowed_hosts]
    return list(dict.fromkeys([site.origin, *extra]))


def allowed_hosts(ctx: RoleContext) -> list[str]:
    """Host headers MLflow answers: the public site's, extra names, and loopback on any port
    (the host's own clients, and `invoke tunnel`'s local ports)."""
    mv = ctx.vars.mlflow
    site = public.site(ctx.vars, ctx.address)
    local = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"]
    return list(dict.fromkeys([*site.host_headers, *mv.allowed_hosts, *local]))


ACCOUNTS_MARK = layout.MLFLOW_ACCOUNTS_MARK  # root's: what the last sync applied


def accounts_digest(admin: str, workload: str) -> str:
    """What the accounts step applied, as a digest of the passwords (the mark holds this and
    the auth database's inode: a new database, e.g. restored or deleted, is synced again)."""
    return hashlib.sha256(f"mlflow-stack accounts v1\0{admin}\0{workload}".encode()).hexdigest()


def accounts_fact() -> F.Fact:
    """What the last sync applied, and the auth database now (`role_facts.MlflowAccounts`).
    Checking logins instead would cost a password hash (≈ 0.1-1.5 s) per account per run."""
    return role_facts.MlflowAccounts()


def accounts_synced(result: F.ShellResult, digest: str) -> bool:
    lines = result.output.split("\n")
    if len(lines) < 2:
        return False
    inode = lines[1].strip()
    return inode != "none" and lines[0].strip() == f"{digest} {inode}"


def config_steps(ctx: RoleContext) -> tuple[list[Step], dict[str, str]]:
    """Secrets, the auth app's config and the env files; (steps, values for mlflow.env)."""
    # a given one shorter than MLflow's minimum (12) is refused by `secrets.given`
    admin = ctx.secret(ADMIN_SECRET, env=ADMIN_ENV)
    stored = ctx.host_secrets.get(ADMIN_SECRET, "").strip()
    workload = ctx.secret(WORKLOAD_SECRET)
    group = MLFLOW_USER
    steps: list[Step] = []
    if stored and stored != admin.reveal():
        # a new admin password: the old one kept until MLflow has the new one (the accounts
        # step changes it through the API)
        steps.append(secret_file(ADMIN_PREVIOUS, stored))
    steps += ctx.secret_steps(
        ADMIN_SECRET, WORKLOAD_SECRET, FLASK_SECRET, env={ADMIN_SECRET: ADMIN_ENV}
    )
    ini = render(
        "mlflow/basic_auth.ini.j2",
        database=layout.MLFLOW_AUTH_DB,
        admin_user=MLFLOW_ADMIN,
        default_permission=ctx.vars.public.default_permission,
    )
    steps += [
        File(layout.MLFLOW_AUTH_CONFIG, ini, "root", group, 0o640, notify=(MLFLOW_UNIT,)),
        # read by MLflow only when it creates the admin: no restart when it changes
        File(
            layout.MLFLOW_ADMIN_ENV,
            public.admin_env(admin),
            "root",
            group,
            0o640,
            secret=True,
        ),
        File(
            MLFLOW_CLIENT_ENV,
            render("mlflow/client.env.j2", user=MLFLOW_WORKLOAD_USER, password=workload.reveal()),
            "root",
            "root",
            0o600,
            secret=True,
            notify=(layout.JUPYTER_UNIT,),
        ),
    ]
    return steps, {"flask_secret_key": ctx.secret(FLASK_SECRET).reveal()}


def account_steps(ctx: RoleContext) -> list[Step]:
    """After MLflow (re)started with its auth app: the admin's password and the workload
    account as the secret store says, through MLflow's API (when they changed since the last
    sync, or the auth database is new)."""
    port = ctx.vars.mlflow.port
    fact = accounts_fact()
    admin = ctx.secret(ADMIN_SECRET, env=ADMIN_ENV).reveal()
    workload = ctx.secret(WORKLOAD_SECRET).reveal()
    older = [ctx.host_secrets.get(n, "").strip() for n in (ADMIN_PREVIOUS, ADMIN_SECRET)]
    passwords = list(dict.fromkeys(p for p in [admin, *older] if p))
    digest = accounts_digest(admin, workload)
    spec = {
        "url": f"http://127.0.0.1:{port}",
        "admin": MLFLOW_ADMIN,
        "passwords": passwords,
        "workload": MLFLOW_WORKLOAD_USER,
        "workload_password": workload,
    }
    accounts = Run(
        "MLflow accounts (admin password, workload account)",
        f"python3 {ACCOUNTS_SCRIPT} && mkdir -p {Path(ACCOUNTS_MARK).parent} && "
        f'echo "{digest} $(stat -c %i {layout.MLFLOW_AUTH_DB})" > {ACCOUNTS_MARK}',
        when=lambda c: not accounts_synced(c[fact], digest),
        needs=(fact,),
        stdin=json.dumps(spec),
        timeout=400,
        id="mlflow_server:accounts",
    )
    accounts.flush_before = True  # MLflow restarted with its auth app first
    return [
        Directory(layout.HOSTSIDE_DIR, "root", "root", 0o755),
        File(ACCOUNTS_SCRIPT, hostside.read("mlflow_accounts.py"), "root", "root", 0o644),
        accounts,
    ]


def off_steps() -> list[Step]:
    """Not public: no credentials for the host's work (MLflow has no accounts then)."""
    fact, mark = F.PathState(MLFLOW_CLIENT_ENV), F.PathState(ACCOUNTS_MARK)
    return [
        Run(
            "no MLflow accounts mark",
            f"rm -f {ACCOUNTS_MARK}",
            when=lambda c: c[mark] is not None,
            needs=(mark,),
        ),
        Run(
            f"no {MLFLOW_CLIENT_ENV} (MLflow without accounts)",
            f"rm -f {MLFLOW_CLIENT_ENV}",
            when=lambda c: c[fact] is not None,
            needs=(fact,),
            notify=(layout.JUPYTER_UNIT,),
        ),
    ]
