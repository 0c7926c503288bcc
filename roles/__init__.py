"""The roles, one module each, in the order of `layout.ROLES`. Each module exposes `role`.

A new role is a module here with `role = Role(name, build)` and its name in `layout.ROLES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mlflow_stack.layout import ROLES

if TYPE_CHECKING:
    from mlflow_stack.engine.role import Role


def get(name: str) -> Role:
    """The role named `name` (a module of this package)."""
    if name not in ROLES:
        raise KeyError(f"unknown role {name!r}; roles: {', '.join(ROLES)}")
    return importlib.import_module(f"roles.{name}").role


def ordered(names: list[str] | tuple[str, ...]) -> list[Role]:
    """Roles for `names`, in the canonical order."""
    return [get(n) for n in ROLES if n in names]
