"""Role `jupyter`: JupyterLab from the `demo` env as a hardened unit, never as root.

Authentication is a token (default) or a password kept as an argon2 hash; either lives in a
config file root owns and only the Jupyter account may read, never on a command line. The plain
token stays in the root-only secret store so `invoke urls` can show it. Jupyter works in the
account's workspace; the shipped notebooks are copied there at its start, by the account.
Nothing calls out unasked (news and update checks off); terminals start bash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlflow_stack import layout, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    Change,
    Directory,
    File,
    PlanContext,
    Schedule,
    Service,
    Step,
    WaitHttp,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import DEMO_ROOT, DEMO_USER, JUPYTER_CONFIG, JUPYTER_UNIT
from roles.accounts import demo_account


def password_hash(password: str) -> str:
    """jupyter_server's `passwd()` format: 'argon2:' + an argon2id hash."""
    import argon2  # only password auth needs it: imported here, not for every run

    hasher = argon2.PasswordHasher(memory_cost=10240, time_cost=10, parallelism=8)
    return "argon2:" + hasher.hash(password)


def hash_matches(hashed: str, password: str) -> bool:
    if not hashed.startswith("argon2:"):
        return False
    import argon2

    try:
        return argon2.PasswordHasher().verify(hashed[len("argon2:") :], password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def existing_hash(config_text: str) -> str:
    try:
        return json.loads(config_text)["PasswordIdentityProvider"]["hashed_password"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return ""


# JupyterLab's own calls home, off: its news feed and its check for newer releases.
QUIET = {
    "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
    # the account has no login shell: Jupyter's terminals get bash
    "ServerApp": {"terminado_settings": {"shell_command": ["/bin/bash"]}},
}
# The same, as the lab's settings defaults (no "Would you like to get notified…?" prompt).
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {
        "checkForUpdates": False,
        "fetchNews": "false",
    }
}


def server_config(auth: str, token: str, hashed_password: str = "") -> str:
    """The Jupyter server config: token auth, or a password hash with tokens off."""
    if auth == "password":
        config: dict = {
            "IdentityProvider": {"token": ""},
            "PasswordIdentityProvider": {
                "hashed_password": hashed_password,
                "password_required": True,
            },
        }
    else:
        config = {"IdentityProvider": {"token": token}}
    return json.dumps({**QUIET, **config}, indent=2, sort_keys=True) + "\n"


def config_file(content: str) -> File:
    """The server config: root's, readable by the Jupyter account alone (it holds the token
    or the hash, which that account must not be able to change)."""
    return File(
        JUPYTER_CONFIG,
        content,
        "root",
        DEMO_USER,
        0o640,
        secret=True,
        notify=(JUPYTER_UNIT,),
    )


@dataclass
class PasswordConfig(Step):
    """The config file in password mode: an existing hash is kept while it still matches."""

    password: str = field(repr=False)

    def __post_init__(self) -> None:
        self.id = f"file:{JUPYTER_CONFIG}"
        self.label = f"file {JUPYTER_CONFIG}"
        self.notify = (JUPYTER_UNIT,)

    def facts(self) -> list[F.Fact]:
        return [*config_file("").facts(), config_fact()]

    def plan(self, ctx: PlanContext) -> Change | None:
        hashed = existing_hash(ctx[config_fact()].output)
        if not hash_matches(hashed, self.password):
            hashed = password_hash(self.password)
        return config_file(server_config("password", "", hashed)).plan(ctx)


def config_fact() -> F.Fact:
    return role_facts.JupyterConfig()


def build(ctx: RoleContext) -> list[Step]:
    jv = ctx.vars.jupyter
    place = layout.Layout.of(ctx.vars)
    if jv.auth == "password":
        secret_name = "jupyter_password"
        password = ctx.secret(secret_name, env="JUPYTER_PASSWORD")
        config: Step = PasswordConfig(password.reveal())
    else:
        secret_name = "jupyter_token"
        token = ctx.secret(secret_name, env="JUPYTER_TOKEN")
        config = config_file(server_config("token", token.reveal()))
    env_prefix = place.env(layout.DEMO_ENV)
    unit = render(
        "systemd/jupyter.service.j2",
        user=DEMO_USER,
        malloc_arenas=ctx.sizing.malloc_arenas,
        state=layout.DEMO_STATE,
        state_name=layout.DEMO_STATE.removeprefix("/var/lib/"),
        workspace=layout.DEMO_WORKSPACE,
        code_root=DEMO_ROOT,
        pycache=layout.DEMO_PYCACHE,
        env_prefix=env_prefix,
        config_file=JUPYTER_CONFIG,
        bind="0.0.0.0" if jv.public else "127.0.0.1",
        port=jv.port,
        tracking_uri=place.tracking_uri,
        data_path=layout.DEMO_DATA,
    )
    overrides = json.dumps(LAB_OVERRIDES, indent=2, sort_keys=True) + "\n"
    return [
        *demo_account(ctx.sizing.warm_runner(ctx.vars.demo.warm_runner) == "always"),
        Directory(layout.JUPYTER_CONF_DIR, "root", DEMO_USER, 0o750),
        *ctx.secret_steps(secret_name, env={secret_name: secret_name.upper()}),
        config,
        Directory(f"{env_prefix}/share/jupyter/lab/settings"),
        File(
            f"{env_prefix}/share/jupyter/lab/settings/overrides.json",
            overrides,
            notify=(JUPYTER_UNIT,),
        ),
        File(layout.unit_file(JUPYTER_UNIT), unit, notify=(JUPYTER_UNIT,), unit_file=True),
        Service(JUPYTER_UNIT),
        WaitHttp(
            "jupyter answers /api",
            f"{place.jupyter_url}/api",
            after=(JUPYTER_UNIT,),
            schedule=Schedule.AT_END,
        ),
    ]


role = Role("jupyter", build)
