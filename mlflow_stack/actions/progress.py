"""A progress line for long transfers (backup, restore): bytes done of an estimate, the rate.

On a terminal (stderr) the line is redrawn in place (at most 5 times a second); otherwise a
line goes to stdout every `every` seconds and when the phase changes, so logs stay readable
and stderr keeps to the one-line error of a failure.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    """1536 -> '1.5 kB'; decimal units, as disks and links are sold."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """`what`: e.g. 'backup of e2e'; `total`: the estimated bytes (0: unknown)."""

    def __init__(
        self, what: str, total: int = 0, out: TextIO | None = None, every: float = 10.0
    ) -> None:
        self.what = what
        self.total = total
        if out is None:
            out = sys.stderr if sys.stderr.isatty() else sys.stdout
        self.out = out
        self.tty = self.out.isatty()
        self.every = every
        self.started = time.monotonic()
        self.done = 0  # source bytes
        self.moved = 0  # bytes over the link
        self.phase = ""
        self._shown = 0.0
        self._width = 0

    def update(self, *, done: int | None = None, moved: int | None = None, phase: str = "") -> None:
        if done is not None:
            self.done = done
        if moved is not None:
            self.moved = moved
        changed = bool(phase) and phase != self.phase
        if phase:
            self.phase = phase
        now = time.monotonic()
        if changed or now - self._shown >= (0.2 if self.tty else self.every):
            self._shown = now
            self._show(self.line())

    def line(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-6)
        share = (
            f" of ~{human(self.total)} ({min(self.done / self.total, 1):.0%})" if self.total else ""
        )
        return (
            f"{self.what}: {self.phase}  {human(self.done)}{share}  "
            f"{human(self.done / seconds)}/s  {human(self.moved)} transferred"
        )

    def _show(self, text: str) -> None:
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.out.write(f"\r{text}{pad}")
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        """End the in-place line (a terminal gets its newline)."""
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
