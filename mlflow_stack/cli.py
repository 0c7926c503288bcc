"""Glue between Invoke tasks and the engine: inventory, host selection, one-line errors.

Importing this module is cheap: the inventory (pydantic, YAML) and the SSH layer (Paramiko)
are imported by the functions that need them, so `invoke --list` or `--help` load neither.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from invoke.exceptions import Exit

from mlflow_stack.vars_view import VarsView

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host
    from mlflow_stack.inventory import Inventory, ResolvedHost


def fail(message: str, code: int = 1) -> Exit:
    """An Invoke exit with a one-line message on stderr."""
    return Exit(f"error: {message}", code=code)


def inventory_path(path: str | None) -> Path:
    """`--inventory`, else $MLFLOW_STACK_INVENTORY, else the repository's inventory.yaml."""
    from mlflow_stack.targets import DEFAULT_INVENTORY

    if path:
        return Path(path)
    return Path(os.environ.get("MLFLOW_STACK_INVENTORY", DEFAULT_INVENTORY))


def load_inventory(path: str | None) -> Inventory:
    from mlflow_stack.inventory import Inventory, InventoryError

    try:
        return Inventory.load(inventory_path(path))
    except InventoryError as exc:
        raise fail(str(exc)) from None


def default_host_spec(inv: Inventory) -> str:
    """The `server` group when it has members, else the local sandbox."""
    server = inv.model.groups.get("server")
    return "server" if server and server.hosts else "sandbox"


def select_hosts(spec: str | None, inventory: str | None) -> tuple[Inventory, list[ResolvedHost]]:
    from mlflow_stack.inventory import InventoryError, resolve

    inv = load_inventory(inventory)
    try:
        return inv, resolve(spec or default_host_spec(inv), inv)
    except InventoryError as exc:
        raise fail(str(exc)) from None


def hosts_for(spec: str | None, inventory: str | None) -> list[ResolvedHost]:
    """`select_hosts`, from the inventory cache when this inventory resolved `spec` before.

    Their vars are `VarsView`s either way (attribute access, like `StackVars`).
    """
    from mlflow_stack import inventory_cache
    from mlflow_stack.targets import InventoryError

    path = inventory_path(inventory)
    try:
        text = path.read_bytes()
        cached = inventory_cache.lookup(path, spec or "")
    except InventoryError as exc:
        raise fail(str(exc)) from None
    except OSError:
        text, cached = None, None  # load_inventory reports a missing file
    if cached is not None:
        return cached
    from mlflow_stack.vars import view

    inv, hosts = select_hosts(spec, inventory)
    if text is not None:
        inventory_cache.store(path, text, spec or "", spec or default_host_spec(inv), inv, hosts)
    return [
        replace(h, vars=h.vars if isinstance(h.vars, VarsView) else view(h.vars)) for h in hosts
    ]


def parse_roles(value: str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    names = tuple(r.strip() for r in value.split(",") if r.strip())
    from mlflow_stack.inventory import ALL_ROLES

    unknown = [r for r in names if r not in ALL_ROLES]
    if unknown:
        raise fail(f"--roles: unknown role {unknown[0]!r}; roles: {', '.join(ALL_ROLES)}")
    return names


def connect(resolved: ResolvedHost) -> Host:
    from mlflow_stack.engine.host import Host, HostError

    host = Host(resolved.target)
    try:
        host.connect()
    except HostError as exc:
        raise fail(str(exc)) from None
    return host


def first_host(spec: str | None, inventory: str | None) -> tuple[ResolvedHost, Host]:
    """The one host an action works on (the first of the 'server' group by default)."""
    hosts = hosts_for(spec, inventory)
    return hosts[0], connect(hosts[0])


def positive_int(value, flag: str, low: int = 1, high: int | None = None) -> int:
    """An integer flag within bounds, else a one-line error naming the flag."""
    try:
        number = int(str(value))
    except ValueError:
        raise fail(f"{flag} {value!r}: not a whole number") from None
    if number < low or (high is not None and number > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise fail(f"{flag} {number}: must be {bounds}")
    return number
