"""The files the Python envs are synced from (`roles/files`), and the digest an env records
after a sync: read by the `anaconda` role and by actions that must know whether a converge
would change an env (the backup before an upgrade), so that actions never import roles."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_stack.engine.steps import StepError

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars

FILES = Path(__file__).resolve().parents[1] / "roles" / "files"


def requirements(env: str, manager: str = "uv") -> str:
    """The pinned requirement (uv) or environment (conda) file of an env."""
    if manager == "conda":
        return (FILES / "environments" / f"{env}.yml").read_text()
    return (FILES / "requirements" / f"{env}.txt").read_text()


def requirements_of(host_vars: HostVars, env: str) -> str:
    """The requirements env `env` is synced from: the pinned file, or (uv) the file the
    `python.requirements` variable names for it, read on the controller."""
    pv = host_vars.python
    given = pv.requirements.get(env) if pv.manager == "uv" else None
    if not given:
        return requirements(env, pv.manager)
    try:
        return Path(given).expanduser().read_text()
    except OSError as exc:
        raise StepError(f"python.requirements.{env}: cannot read {given}: {exc.strerror}") from None


def digest(text: str) -> str:
    """What an env records after a sync (role_facts.STAMP): its requirements' sha256."""
    return hashlib.sha256(text.encode()).hexdigest()
