"""A host's variables as roles and actions read them: `v.mysql.port`, read-only.

The inventory validates `vars:` with the `StackVars` schema (`vars.py`); what the controller
keeps (and caches, see `inventory_cache`) is the validated dump, read back through `HostVars`
without importing pydantic.
"""

from __future__ import annotations

import copy
from typing import Any


class Section:
    """One validated mapping, read by attribute; mutable values are copied out."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(name) from None
        return copy.deepcopy(value) if isinstance(value, (dict, list)) else value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and self._values == other._values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._values!r})"

    def as_dict(self) -> dict[str, Any]:
        """A deep copy of the values."""
        return copy.deepcopy(self._values)


class HostVars(Section):
    """All variables of a host: its `sections` are `Section`s (`v.mlflow.port`), the rest
    (e.g. the free-form `test`) plain values."""

    __slots__ = ()

    def __init__(self, dump: dict[str, Any], sections: tuple[str, ...]) -> None:
        super().__init__(
            {k: Section(v) if k in sections else v for k, v in copy.deepcopy(dump).items()}
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v.as_dict() if isinstance(v, Section) else copy.deepcopy(v)
            for k, v in self._values.items()
        }
