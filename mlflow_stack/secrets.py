"""Secret values: a string type that never shows itself, and masking of printed text."""

from __future__ import annotations

import secrets as _random
import threading

MASK = "********"

_known: set[str] = set()
_lock = threading.Lock()


class Secret:
    """A secret value. `str()`/`repr()` print a mask; `.reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value
        register(value)

    def reveal(self) -> str:
        """The plain value: only for stdin, 0600 files and password checks."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _random.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def register(value: str) -> None:
    """Remember a value so that `mask` hides it wherever it appears."""
    if len(value) >= 4:
        with _lock:
            _known.add(value)


def mask(text: str) -> str:
    """Replace every known secret value in `text` by the mask."""
    if not _known or not text:
        return text
    with _lock:
        values = sorted(_known, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def generate(nbytes: int = 24) -> Secret:
    """A new random URL-safe secret."""
    return Secret(_random.token_urlsafe(nbytes))
