"""`invoke users.add|list|passwd|grant|remove`: MLflow's accounts, through its auth REST API
at the public site, over HTTPS verified against the pinned CA, as the admin (whose password
is read from the host's secret store over SSH).

Passwords come on stdin (a prompt on a terminal) or are generated (and then shown once);
never on a command line. The admin's own password changes through the API (MLflow checks the
current one), then the secret store is updated, the old one kept as
`mlflow_admin_password_previous` until a provision has seen it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_stack import inputs, layout, public, secrets
from mlflow_stack.actions import public as site
from mlflow_stack.actions.remote import ActionError
from mlflow_stack.engine.steps import install_file_script
from mlflow_stack.secrets import Secret

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host
    from mlflow_stack.targets import ResolvedHost

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
MIN_PASSWORD = secrets.MIN_LENGTH  # MLflow's minimum too
ADMIN_SECRET = "mlflow_admin_password"
ADMIN_PREVIOUS = "mlflow_admin_password_previous"
USERS = "/api/2.0/mlflow/users"
PERMISSIONS_API = "/api/3.0/mlflow/users/permissions"


def check_username(name: str | None, action: str) -> str:
    if not name:
        raise ActionError(f"users.{action}: give a user name, e.g. invoke users.{action} alice")
    return inputs.account(name)


def check_password(value: str) -> Secret:
    """One line of at least 12 characters, no control characters or surrounding blanks
    (never shown: the message says why, not what)."""
    value = value.rstrip("\r\n")
    if len(value) < MIN_PASSWORD:
        raise ActionError(f"the password needs at least {MIN_PASSWORD} characters (MLflow's rule)")
    problem = secrets.problem(value)
    if problem:
        raise ActionError(f"the password is refused: {problem}")
    return Secret(value)


def read_password(generate: bool, stdin=None) -> tuple[Secret, bool]:
    """(password, generated): a new one, else from stdin (a prompt twice on a terminal)."""
    if generate:
        return secrets.generate(18), True
    stdin = stdin or sys.stdin
    if stdin.isatty():
        import getpass

        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise ActionError("the two passwords differ")
        return check_password(first), False
    line = stdin.readline()
    if not line:
        raise ActionError(
            "no password on stdin: pipe one in (e.g. from a password manager) or use --generate"
        )
    return check_password(line), False


@dataclass
class Admin:
    """The admin's session at the public site."""

    client: site.Outside
    password: Secret

    @property
    def auth(self) -> tuple[str, Secret]:
        return (layout.MLFLOW_ADMIN, self.password)

    def call(self, method: str, path: str, *, what: str, ok=(200,), **kwargs) -> site.Answer:
        answer = self.client.request(method, path, auth=self.auth, **kwargs)
        if answer.status == 401:
            raise ActionError(
                "the admin password in the host's secret store does not log in to MLflow; "
                "run invoke provision (it applies the stored one)"
            )
        hint = site.host_header_hint(answer, self.client)
        if hint:
            raise ActionError(hint)
        if answer.status not in ok:
            raise ActionError(f"{what}: MLflow answered {answer.status}: {answer.message()}")
        return answer


def connect(host: Host, resolved: ResolvedHost) -> Admin:
    """The admin at the public site: the pin and the admin password fetched in one probe."""
    v = resolved.vars
    if not v.mlflow.public:
        raise ActionError(
            f"{host.name}: MLflow is not public (no accounts); set mlflow: {{public: true}} "
            "and run invoke provision"
        )
    fact = site.secret_fact(ADMIN_SECRET)
    client, values = site.outside(host, v, resolved.target.address, [fact])
    password = values[fact.key].output.strip()
    if not password:
        raise ActionError(f"{host.name}: no MLflow admin password in the secret store")
    return Admin(client, Secret(password))


def add(admin: Admin, name: str, password: Secret) -> None:
    admin.call(
        "POST",
        f"{USERS}/create",
        what=f"creating {name}",
        body={"username": name, "password": password.reveal()},
    )


def list_users(admin: Admin) -> list[dict]:
    users = admin.call("GET", f"{USERS}/list", what="listing users").json().get("users", [])
    return sorted(users, key=lambda u: u.get("username", ""))


def grants(admin: Admin, name: str) -> list[dict]:
    answer = admin.call(
        "GET", f"{PERMISSIONS_API}/list", what="listing grants", params={"username": name}
    )
    return answer.json().get("permissions", [])


def render_users(admin: Admin, users: list[dict], default_permission: str) -> list[str]:
    lines = []
    for user in users:
        name = user.get("username", "?")
        role = "admin" if user.get("is_admin") else "user"
        if name == layout.MLFLOW_WORKLOAD_USER:
            role += " (the host's own work: train, tune, Jupyter, model servers)"
        shown = [
            f"{g.get('resource_type')} {g.get('resource_pattern')}: {g.get('permission')}"
            for g in ([] if user.get("is_admin") else grants(admin, name))
        ]
        lines.append(f"{name:<20} {role}")
        lines += [f"{'':<20}   {g}" for g in shown]
    lines.append(
        f"(on anything not granted, users have the default permission: {default_permission})"
    )
    return lines


def passwd(host: Host, admin: Admin, name: str, password: Secret) -> None:
    """A user's new password; the admin's own through MLflow's check of the current one,
    then the host's secret store (and the bootstrap file) get it."""
    if name == layout.MLFLOW_WORKLOAD_USER:
        raise ActionError(
            f"{name} is the host's own account: provisioning sets its password (from the "
            "secret store, mlflow_workload_password)"
        )
    body = {"username": name, "password": password.reveal()}
    if name == layout.MLFLOW_ADMIN:
        body["current_password"] = admin.password.reveal()
    admin.call("PATCH", f"{USERS}/update-password", what=f"changing {name}'s password", body=body)
    if name != layout.MLFLOW_ADMIN:
        return
    store = [
        (layout.secret_path(ADMIN_PREVIOUS), "root", 0o600, admin.password.reveal() + "\n"),
        (layout.secret_path(ADMIN_SECRET), "root", 0o600, password.reveal() + "\n"),
        (layout.MLFLOW_ADMIN_ENV, layout.MLFLOW_USER, 0o640, public.admin_env(password)),
    ]
    for path, group, mode, text in store:
        result = host.run(install_file_script(path, "root", group, mode), stdin=text)
        if not result.ok:
            raise ActionError(
                f"MLflow has the admin's new password, but writing {path} on {host.name} "
                f"failed ({secrets.mask(result.tail())}); rerun with the same password: "
                f"MLFLOW_ADMIN_PASSWORD=... invoke provision --host {host.name}"
            )


def experiment_id(admin: Admin, experiment: str) -> str:
    """An experiment's id from its id or name."""
    if experiment.isdigit():
        return experiment
    answer = admin.call(
        "GET",
        "/api/2.0/mlflow/experiments/get-by-name",
        what=f"looking up experiment {experiment!r}",
        ok=(200, 404),
        params={"experiment_name": experiment},
    )
    if answer.status == 404:
        raise ActionError(f"no experiment named {experiment!r}")
    return answer.json()["experiment"]["experiment_id"]


def check_grant(experiment: str | None, model: str | None, permission: str) -> str:
    """The permission, upper-cased, once the flags make one grant; else ActionError."""
    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise ActionError(f"--permission {permission}: one of {', '.join(PERMISSIONS)}")
    if bool(experiment) == bool(model):
        raise ActionError("give exactly one of --experiment NAME|ID or --model NAME")
    if experiment:
        inputs.experiment(experiment)
    else:
        inputs.text(model, "--model")
    return permission


def grant(
    admin: Admin, name: str, experiment: str | None, model: str | None, permission: str
) -> str:
    """Grant `permission` on an experiment (name or id) or a registered model; what it was."""
    permission = check_grant(experiment, model, permission)
    if experiment:
        kind, resource = "experiment", experiment_id(admin, experiment)
    else:
        kind, resource = "registered_model", model or ""
    body = {
        "username": name,
        "resource_type": kind,
        "resource_id": resource,
        "permission": permission,
    }
    admin.call("POST", f"{PERMISSIONS_API}/grant", what=f"granting {kind} {resource}", body=body)
    return f"{kind} {resource}"


def remove(admin: Admin, name: str) -> None:
    if name in (layout.MLFLOW_ADMIN, layout.MLFLOW_WORKLOAD_USER):
        raise ActionError(f"{name} is one of the stack's own accounts: it stays")
    admin.call("DELETE", f"{USERS}/delete", what=f"removing {name}", body={"username": name})
