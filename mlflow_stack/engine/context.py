"""What a role sees while building its steps: the host's base facts, its vars, its secrets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlflow_stack import secrets
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import PENDING_DIR, Directory, File, Step
from mlflow_stack.layout import SECRETS_DIR, secret_path
from mlflow_stack.sizing import Sizing

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars


@dataclass
class RoleContext:
    """Built once per host and run from the base probe; roles read it, never SSH."""

    host: str
    os: F.OsInfo
    vars: HostVars
    size: F.HostSize
    host_secrets: dict[str, str] = field(default_factory=dict)
    address: str = ""  # how the controller reaches the host (for allowed hosts, URLs)
    private_address: str = ""  # how the inventory's other hosts reach it
    workers: tuple[str, ...] = ()  # a server's tuning workers (their private addresses)
    _secrets: dict[str, secrets.Secret] = field(default_factory=dict, repr=False)

    @property
    def sizing(self) -> Sizing:
        """The stack's size for this host: `sizing.profile`, or chosen from its facts."""
        return Sizing.of(self.size, self.vars.sizing.profile)

    def secret(self, name: str, env: str | None = None) -> secrets.Secret:
        """A named secret: from `env` when set (refused if shorter than
        `secrets.MIN_LENGTH`), else as stored on the host (replaced by a new one if it is that
        short), else new."""
        if name not in self._secrets:
            chosen = secrets.given(env) if env else None
            stored = self.host_secrets.get(name, "").strip()
            if chosen is None and stored and secrets.problem(stored) is None:
                chosen = secrets.Secret(stored)
            self._secrets[name] = chosen or secrets.generate()
        return self._secrets[name]

    def secret_steps(self, *names: str, env: dict[str, str] | None = None) -> list[Step]:
        """Steps keeping the named secrets in 0600 files on the host (root only)."""
        env = env or {}
        steps: list[Step] = [Directory(SECRETS_DIR, mode=0o700)]
        for name in names:
            value = self.secret(name, env.get(name)).reveal()
            steps.append(
                File(
                    secret_path(name),
                    value + "\n",
                    mode=0o600,
                    secret=True,
                    label=f"secret {name}",
                )
            )
        return steps


def base_facts() -> list[F.Fact]:
    """Facts every run needs before roles can build their steps."""
    return [F.OsRelease(), F.Size(), F.DirListing(PENDING_DIR), F.FileContents(SECRETS_DIR)]
