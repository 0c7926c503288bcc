"""Secret values: a string type that never shows itself, and masking of printed text.

Every secret the tool holds is registered, with the forms it takes on the way (URL-encoded
as in a database URL, JSON-escaped as in a config file), and `mask()` hides all of them in
whatever leaves the tool: step lines, one-line errors, streamed remote output. Secrets a user
gives (`GIVEN`) are at least `MIN_LENGTH` characters; shorter ones are refused, so masking
never has to hide a fragment as common as a word.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import threading
from urllib.parse import quote, quote_plus

from mlflow_stack.errors import UserError

MASK = "********"
MIN_LENGTH = 12
# Environment variables a user may set to choose a secret instead of a generated one.
GIVEN = (
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_TUNING_DB_PASSWORD",
    "JUPYTER_TOKEN",
    "JUPYTER_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
)

_known: set[str] = set()
_lock = threading.Lock()


class SecretError(UserError):
    """A secret given (or stored) is unusable; the message names it, never its value."""


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


def forms(value: str) -> set[str]:
    """`value` and the forms it takes in URLs and JSON (each as it would appear in text)."""
    return {
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }


def register(value: str) -> None:
    """Remember a value (and its encoded forms) so that `mask` hides it wherever it appears."""
    if not value:
        return
    with _lock:
        _known.update(f for f in forms(value) if f)


def mask(text: str) -> str:
    """Replace every known secret value (in any of its forms) in `text` by the mask."""
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


def problem(value: str) -> str | None:
    """Why `value` cannot be a secret of ours (never quoting it), or None."""
    if len(value) < MIN_LENGTH:
        return f"shorter than {MIN_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it holds a control character (newline, NUL, …)"
    if value != value.strip():
        return "it starts or ends with whitespace"
    return None


def given(env: str) -> Secret | None:
    """The secret a user set in `env` (None when unset or empty); `SecretError` if unusable."""
    value = os.environ.get(env)
    if not value:
        return None
    why = problem(value)
    if why:
        raise SecretError(
            f"{env}: the secret given is refused: {why}; give a longer one "
            f"(at least {MIN_LENGTH} characters) or unset it to have one generated"
        )
    return Secret(value)


def check_given() -> None:
    """Refuse any unusable secret given in the environment (before anything connects)."""
    for env in GIVEN:
        given(env)
