"""Expected errors and the CLI wrapper that prints them as one line (exit code 2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class InputError(ValueError):
    """Bad user input (parameters, data): reported as one line, exit code 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are a single line on stderr with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; turn an :class:`InputError` into one stderr line and exit code 2."""
    try:
        return main(argv)
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def parse_number(
    name: str, text: str | float, *, low: float | None = None, high: float | None = None
) -> float:
    """Parse a finite float within [low, high]; raise :class:`InputError` naming ``name``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{name} must be a finite number, got {text!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bounds = f">= {low:g}"
        elif low is None:
            bounds = f"<= {high:g}"
        else:
            bounds = f"in [{low:g}, {high:g}]"
        raise InputError(f"{name} must be {bounds}, got {text!r}")
    return value


def parse_int(name: str, text: str | int, *, low: int = 0) -> int:
    """Parse an integer >= ``low``; raise :class:`InputError` naming ``name``."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise InputError(f"{name} must be an integer, got {text!r}") from None
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {text!r}")
    return value
