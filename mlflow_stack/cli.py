"""What every task shares: inventory and host selection, connections, one-line errors.

Importing this module is cheap: the inventory (pydantic, YAML) and the SSH layer are imported
by the functions that need them, so `invoke --list` or `--help` load neither.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from invoke.exceptions import Exit

from mlflow_stack.errors import UserError
from mlflow_stack.secrets import mask

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host
    from mlflow_stack.inventory import Inventory
    from mlflow_stack.targets import ResolvedHost


def fail(message: str, code: int = 1) -> Exit:
    """An Invoke exit with a one-line message on stderr."""
    return Exit(f"error: {message}", code=code)


@contextlib.contextmanager
def reporting(code: int = 1) -> Iterator[None]:
    """Any `UserError` raised inside becomes the task's one-line error and exit `code`."""
    try:
        yield
    except UserError as exc:
        raise fail(mask(str(exc)), code) from None


def say(*lines: str) -> None:
    """Print lines for the user, masked (`secrets.mask`): what the tool prints, it masks."""
    for line in lines:
        print(mask(line), flush=True)


def inventory_path(path: str | None) -> Path:
    """`--inventory`, else $MLFLOW_STACK_INVENTORY, else the repository's inventory.yaml."""
    from mlflow_stack.targets import DEFAULT_INVENTORY

    if path:
        return Path(path)
    return Path(os.environ.get("MLFLOW_STACK_INVENTORY", DEFAULT_INVENTORY))


def load_inventory(path: str | None) -> Inventory:
    from mlflow_stack.inventory import Inventory

    with reporting():
        return Inventory.load(inventory_path(path))


def hosts_for(spec: str | None, inventory: str | None) -> list[ResolvedHost]:
    """The hosts `spec` names (default: the `server` group, else the sandbox), from the
    inventory cache when this very inventory resolved `spec` before."""
    from mlflow_stack import inventory_cache
    from mlflow_stack.inventory import default_host_spec, resolve

    path = inventory_path(inventory)
    with reporting():
        try:
            text = path.read_bytes()
        except OSError:
            text = None  # load_inventory reports a missing file
        cached = inventory_cache.lookup(path, spec or "") if text is not None else None
        if cached is not None:
            return cached
        inv = load_inventory(inventory)
        effective = spec or default_host_spec(inv)
        hosts = resolve(effective, inv)
        if text is not None:
            inventory_cache.store(path, text, spec or "", effective, inv, hosts)
        return hosts


def parse_roles(value: str | None) -> tuple[str, ...] | None:
    """`--roles a,b` as role names (None: the hosts' own roles)."""
    from mlflow_stack.layout import ROLES

    if not value:
        return None
    names = tuple(r.strip() for r in value.split(",") if r.strip())
    unknown = [r for r in names if r not in ROLES]
    if unknown:
        raise fail(f"--roles: unknown role {unknown[0]!r}; roles: {', '.join(ROLES)}")
    return names


@contextlib.contextmanager
def connected(hosts: list[ResolvedHost]) -> Iterator[dict[str, Host]]:
    """One open SSH link per distinct host (opened in parallel), closed at the end; any
    `UserError` inside becomes the task's one-line error."""
    from mlflow_stack.engine.host import Host

    unique = {h.name: h for h in hosts}
    links = {name: Host(h.target) for name, h in unique.items()}
    try:
        with reporting():
            with ThreadPoolExecutor(max_workers=max(1, len(links))) as pool:
                list(pool.map(lambda link: link.connect(), links.values()))
            yield links
    finally:
        for link in links.values():
            link.close()


@contextlib.contextmanager
def on_host(spec: str | None, inventory: str | None) -> Iterator[tuple[ResolvedHost, Host]]:
    """The one host an action works on (the first of `spec`, by default of the `server`
    group), connected; closed at the end."""
    resolved = hosts_for(spec, inventory)[0]
    with connected([resolved]) as links:
        yield resolved, links[resolved.name]
