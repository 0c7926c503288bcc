"""Role `jupyter`: JupyterLab from the `demo` env as a hardened unit, never as root.

Authentication is a token (default) or a password kept as an argon2 hash; either lives in a
0600 config file owned by the Jupyter user, never on a command line. The plain token stays
in the root-only secret store so `invoke urls` can show it.
"""

from __future__ import annotations

import json

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.runner import Role
from mlflow_stack.engine.steps import (
    Directory,
    File,
    PlanContext,
    Service,
    Step,
    SystemUser,
    WaitHttp,
)
from mlflow_stack.engine.templating import render

USER = "demo"
ROOT_DIR = "/opt/demo"
CONF_DIR = "/etc/jupyter-demo"
CONFIG_FILE = f"{CONF_DIR}/jupyter_server_config.json"
UNIT = "jupyter.service"
DATA_PATH = f"{ROOT_DIR}/data/winequality-white.csv"


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


class PasswordConfig(File):
    """The config file in password mode: an existing hash is kept while it still matches."""

    def __init__(self, password: str, **kwargs) -> None:
        super().__init__(CONFIG_FILE, "", **kwargs)
        self._password = password

    def facts(self) -> list[F.Fact]:
        return [*super().facts(), config_fact()]

    def plan(self, ctx: PlanContext):
        hashed = existing_hash(ctx[config_fact()].output)
        if not hash_matches(hashed, self._password):
            hashed = password_hash(self._password)
        self.content = server_config("password", "", hashed)
        return super().plan(ctx)


def config_fact() -> F.Shell:
    return F.Shell("jupyter config", f"cat {CONFIG_FILE}")


def build(ctx: RoleContext) -> list[Step]:
    jv = ctx.vars.jupyter
    env_prefix = f"{ctx.vars.python.prefix}/envs/demo"
    file_kwargs = {
        "owner": USER,
        "group": USER,
        "mode": 0o600,
        "secret": True,
        "notify": (UNIT,),
        "label": f"file {CONFIG_FILE}",
    }
    if jv.auth == "password":
        secret_name = "jupyter_password"
        password = ctx.secret(secret_name, env="JUPYTER_PASSWORD")
        config: Step = PasswordConfig(password.reveal(), **file_kwargs)
    else:
        secret_name = "jupyter_token"
        token = ctx.secret(secret_name, env="JUPYTER_TOKEN")
        config = File(CONFIG_FILE, server_config("token", token.reveal()), **file_kwargs)
    unit = render(
        "systemd/jupyter.service.j2",
        user=USER,
        root_dir=ROOT_DIR,
        env_prefix=env_prefix,
        config_file=CONFIG_FILE,
        bind="0.0.0.0" if jv.public else "127.0.0.1",
        port=jv.port,
        tracking_uri=f"http://127.0.0.1:{ctx.vars.mlflow.port}",
        data_path=DATA_PATH,
    )
    return [
        SystemUser(USER, home=ROOT_DIR, shell="/bin/bash"),
        Directory(ROOT_DIR, USER, USER, 0o755),
        Directory(CONF_DIR, "root", USER, 0o750),
        *ctx.secret_steps(secret_name, env={secret_name: secret_name.upper()}),
        config,
        File(f"/etc/systemd/system/{UNIT}", unit, notify=(UNIT,), unit_file=True),
        Service(UNIT),
        WaitHttp(
            "jupyter answers /api", f"http://127.0.0.1:{jv.port}/api", after=(UNIT,), defer=True
        ),
    ]


role = Role("jupyter", build)
