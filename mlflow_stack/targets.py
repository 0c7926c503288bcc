"""Resolved hosts, without the inventory's validation machinery (no YAML, no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_stack.engine.link import Target
from mlflow_stack.errors import UserError

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars

DEFAULT_INVENTORY = Path(__file__).resolve().parents[1] / "inventory.yaml"


class InventoryError(UserError):
    """A problem with the inventory or a `--host` value; the message is one line."""


@dataclass(frozen=True)
class ResolvedHost:
    """A host ready to converge: how to reach it, which roles, which variables, and where it
    sits among the inventory's hosts."""

    name: str
    target: Target
    roles: tuple[str, ...]
    vars: HostVars
    groups: tuple[str, ...] = ()
    private_address: str = ""  # how the other hosts reach it ("" = the SSH address)
    workers: tuple[str, ...] = ()  # a server's tuning workers, by their private addresses

    @property
    def peer_address(self) -> str:
        """The address the inventory's other hosts reach this one at."""
        return self.private_address or self.target.address


def sandbox_target(host_name: str, sandbox_name: str) -> Target:
    """How to reach the running sandbox `sandbox_name` (read from its state, every time)."""
    from mlflow_stack import sandbox

    info = sandbox.load(sandbox_name)
    if info is None:
        raise InventoryError(
            f"host {host_name!r}: sandbox {sandbox_name!r} is not running; "
            f"start it with: invoke sandbox.up --name {sandbox_name}"
        )
    return Target(
        host_name,
        info.address,
        info.port,
        info.user,
        info.key_file,
        info.known_hosts,  # the sandbox's own key, pinned when it was made
        host_key_policy="strict",
    )
