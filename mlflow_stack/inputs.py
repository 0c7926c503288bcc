"""Operator inputs checked at the boundary: each a value of the right type within bounds, or an
`InputError` whose one line names the flag, the value and what is allowed."""

from __future__ import annotations

import math

from mlflow_stack.errors import UserError


class InputError(UserError):
    """A flag's value is refused; the message names the flag and what it accepts."""


def whole_number(value: object, flag: str, low: int = 1, high: int | None = None) -> int:
    """An integer flag within bounds."""
    try:
        number = int(str(value))
    except ValueError:
        raise InputError(f"{flag} {value!r}: not a whole number") from None
    if number < low or (high is not None and number > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise InputError(f"{flag} {number}: must be {bounds}")
    return number


def number(value: object, flag: str, low: float, high: float | None = None) -> float:
    """A finite float flag within bounds."""
    try:
        result = float(str(value))
    except ValueError:
        raise InputError(f"{flag} {value!r}: not a number") from None
    if not math.isfinite(result) or result < low or (high is not None and result > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise InputError(f"{flag} {value}: must be {bounds}")
    return result


def port(value: object, flag: str = "--port") -> int:
    """A TCP port a service of ours may listen on (not a privileged one)."""
    return whole_number(value, flag, 1024, 65535)
