"""Invoke tasks for MLflow's accounts on a public host: `users.add`, `.list`, `.passwd`,
`.grant`, `.remove` (Invoke's namespace for `invoke users add|list|passwd|grant|remove`).

They work as MLflow's admin over HTTPS, TLS verified against the pinned CA. A password comes
on stdin (a prompt twice on a terminal) or is generated with --generate and shown once;
never on the command line.
"""

from __future__ import annotations

from invoke import Collection, task

from mlflow_stack import cli

HOST_HELP = "host (default: the 'server' group)"
INVENTORY_HELP = "inventory file (default: inventory.yaml, or $MLFLOW_STACK_INVENTORY)"
GENERATE_HELP = "generate the password (shown once) instead of reading it from stdin"


def _user(username: str, action: str) -> str:
    from mlflow_stack.actions import users as accounts

    with cli.reporting(code=2):
        return accounts.check_username(username, action)


def _password(generate: bool):
    from mlflow_stack.actions import users as accounts

    with cli.reporting(code=2):
        return accounts.read_password(generate)


def _done(admin, message: str, name: str = "", password=None, generated=False) -> None:
    cli.say(f"{message} on {admin.client.site.url}")
    if password is not None and generated:  # the one place it shows: unmasked, on purpose
        print(f"password of {name} (shown once): {password.reveal()}", flush=True)


@task(
    positional=["username"],
    help={"username": "the new MLflow user", "generate": GENERATE_HELP, "host": HOST_HELP,
          "inventory": INVENTORY_HELP},
)  # fmt: skip
def add(c, username, generate=False, host=None, inventory=None):
    """Create an MLflow user (password on stdin, or --generate)."""
    from mlflow_stack.actions import users as accounts

    name = _user(username, "add")
    password, generated = _password(generate)
    with cli.on_host(host, inventory) as (resolved, h):
        admin = accounts.connect(h, resolved)
        accounts.add(admin, name, password)
    _done(admin, f"added {name}", name, password, generated)


@task(name="list", help={"host": HOST_HELP, "inventory": INVENTORY_HELP})
def list_(c, host=None, inventory=None):
    """List MLflow's users, and what each was granted."""
    from mlflow_stack.actions import users as accounts

    with cli.on_host(host, inventory) as (resolved, h):
        admin = accounts.connect(h, resolved)
        found = accounts.list_users(admin)
        lines = accounts.render_users(admin, found, resolved.vars.public.default_permission)
    cli.say(*lines)


@task(
    positional=["username"],
    help={"username": "the MLflow user (admin: also updates the host's secret store)",
          "generate": GENERATE_HELP, "host": HOST_HELP, "inventory": INVENTORY_HELP},
)  # fmt: skip
def passwd(c, username, generate=False, host=None, inventory=None):
    """Set a user's password (on stdin, or --generate); `admin` rotates the admin's."""
    from mlflow_stack.actions import users as accounts

    name = _user(username, "passwd")
    password, generated = _password(generate)
    with cli.on_host(host, inventory) as (resolved, h):
        admin = accounts.connect(h, resolved)
        accounts.passwd(h, admin, name, password)
    _done(admin, f"changed {name}'s password", name, password, generated)


@task(
    positional=["username"],
    help={"username": "the MLflow user", "experiment": "an experiment's name or id",
          "model": "or a registered model's name",
          "permission": "READ, USE, EDIT, MANAGE or NO_PERMISSIONS (default EDIT)",
          "host": HOST_HELP, "inventory": INVENTORY_HELP},
)  # fmt: skip
def grant(c, username, experiment=None, model=None, permission="EDIT", host=None, inventory=None):
    """Grant a user a permission on one experiment or registered model."""
    from mlflow_stack.actions import users as accounts

    name = _user(username, "grant")
    with cli.reporting(code=2):
        permission = accounts.check_grant(experiment, model, permission)
    with cli.on_host(host, inventory) as (resolved, h):
        admin = accounts.connect(h, resolved)
        what = accounts.grant(admin, name, experiment, model, permission)
    _done(admin, f"granted {name} {permission} on {what}")


@task(
    positional=["username"],
    help={"username": "the MLflow user", "host": HOST_HELP, "inventory": INVENTORY_HELP},
)
def remove(c, username, host=None, inventory=None):
    """Delete an MLflow user (not admin, not the host's own account demo)."""
    from mlflow_stack.actions import users as accounts

    name = _user(username, "remove")
    with cli.on_host(host, inventory) as (resolved, h):
        admin = accounts.connect(h, resolved)
        accounts.remove(admin, name)
    _done(admin, f"removed {name}")


ns = Collection("users")
for _task in (add, list_, passwd, grant, remove):
    ns.add_task(_task)
