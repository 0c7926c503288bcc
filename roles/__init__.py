"""The roles, in the order `provision` runs them. Each module exposes `role: Role`."""

from __future__ import annotations

import importlib

from mlflow_stack.engine.runner import Role

ORDER = ("anaconda", "mysql", "mlflow_server", "jupyter", "demo_files")


def get(name: str) -> Role:
    """The role named `name` (a module of this package)."""
    if name not in ORDER:
        raise KeyError(f"unknown role {name!r}; roles: {', '.join(ORDER)}")
    return importlib.import_module(f"roles.{name}").role


def ordered(names: list[str] | tuple[str, ...]) -> list[Role]:
    """Roles for `names`, in the canonical order."""
    return [get(n) for n in ORDER if n in names]
