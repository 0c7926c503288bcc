"""A role: a name and the function that builds its steps from the host's context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow_stack.engine.context import RoleContext
    from mlflow_stack.engine.steps import Step


@dataclass(frozen=True)
class Role:
    """A named list of steps, built from the host's context (never SSH)."""

    name: str
    build: Callable[[RoleContext], list[Step]]
