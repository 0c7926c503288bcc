"""Role `jupyter`: JupyterLab from the `demo` env as a hardened unit, never as root.

Authentication is a token (default) or a password kept as an argon2 hash; either lives in a
0600 config file owned by the Jupyter user, never on a command line. The plain token stays
in the root-only secret store so `invoke urls` can show it.
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
    SystemUser,
    WaitHttp,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import DEMO_ROOT, DEMO_USER, JUPYTER_CONFIG, JUPYTER_UNIT


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


def server_config(auth: str, token: str, hashed_password: str = "") -> str:
    """The Jupyter server config: token auth, or a password hash with tokens off."""
    if auth == "password":
        config = {
            "IdentityProvider": {"token": ""},
            "PasswordIdentityProvider": {
                "hashed_password": hashed_password,
                "password_required": True,
            },
        }
    else:
        config = {"IdentityProvider": {"token": token}}
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def config_file(content: str) -> File:
    """The server config: the Jupyter user's, 0600 (it holds the token or the hash)."""
    return File(
        JUPYTER_CONFIG,
        content,
        DEMO_USER,
        DEMO_USER,
        0o600,
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
    unit = render(
        "systemd/jupyter.service.j2",
        user=DEMO_USER,
        root_dir=DEMO_ROOT,
        pycache=layout.DEMO_PYCACHE,
        env_prefix=place.env(layout.DEMO_ENV),
        config_file=JUPYTER_CONFIG,
        bind="0.0.0.0" if jv.public else "127.0.0.1",
        port=jv.port,
        tracking_uri=place.tracking_uri,
        data_path=layout.DEMO_DATA,
    )
    return [
        SystemUser(DEMO_USER, home=DEMO_ROOT, shell="/bin/bash"),
        Directory(DEMO_ROOT, DEMO_USER, DEMO_USER, 0o755),
        Directory(layout.JUPYTER_CONF_DIR, "root", DEMO_USER, 0o750),
        *ctx.secret_steps(secret_name, env={secret_name: secret_name.upper()}),
        config,
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
