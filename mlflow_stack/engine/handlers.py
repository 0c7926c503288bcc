"""Handlers: the units a run owes a restart, restarted once, after one `daemon-reload`.

A pending restart is marked on the host (`PENDING_DIR`) before the change that causes it, so
a run that dies in between still restarts the unit next time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_stack.engine.steps import PENDING_DIR, q


def with_markers(units: tuple[str, ...], script: str) -> str:
    """`script` preceded by the pending-restart markers of `units`."""
    markers = " ".join(f"{PENDING_DIR}/{q(u)}" for u in units)
    return f"mkdir -p {PENDING_DIR} && touch {markers} && {{ {script}\n}}"


@dataclass
class Handlers:
    """Units owed a restart (in the order they were notified) and what the run restarted."""

    pending: list[str] = field(default_factory=list)
    reload_pending: bool = False  # a unit file changed: daemon-reload before (re)starting
    restarted: set[str] = field(default_factory=set)

    def notify(self, units: tuple[str, ...], started: tuple[str, ...] = ()) -> None:
        """`units` owe a restart, except those the change itself (re)started."""
        for unit in units:
            if unit not in self.pending and unit not in started:
                self.pending.append(unit)

    def started(self, units: tuple[str, ...]) -> None:
        """A step (re)started `units`: their restarts are paid."""
        for unit in units:
            self.restarted.add(unit)
            if unit in self.pending:
                self.pending.remove(unit)

    def due(self, units: list[str] | tuple[str, ...]) -> list[str]:
        return [u for u in units if u in self.pending]

    def restart_script(self, units: list[str], *, only_active: bool = False) -> str:
        """Restart `units` (`only_active`: those running), then clear their markers."""
        parts = ["systemctl daemon-reload"] if self.reload_pending else []
        if only_active:
            parts += [
                f"{{ ! systemctl -q is-active {q(u)} || systemctl restart {q(u)}; }}" for u in units
            ]
        else:
            parts += [f"systemctl restart {q(u)}" for u in units]
        parts.append("rm -f " + " ".join(f"{PENDING_DIR}/{q(u)}" for u in units))
        return " && ".join(parts)

    def done(self, units: list[str], *, applied: bool) -> None:
        """`units` were restarted (or, in check mode, would have been)."""
        if applied:
            self.reload_pending = False
            self.restarted.update(units)
        for unit in units:
            self.pending.remove(unit)
