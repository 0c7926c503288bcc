"""Results of a run and how they are shown: a line per step, a recap per host, or JSON."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TextIO

from mlflow_stack.secrets import mask


class Status(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    FAILED = "failed"


@dataclass
class StepResult:
    host: str
    role: str
    step: str
    status: Status
    summary: str = ""
    seconds: float = 0.0
    diff: str | None = None


@dataclass
class HostRecap:
    host: str
    results: list[StepResult] = field(default_factory=list)
    role_seconds: dict[str, float] = field(default_factory=dict)
    ssh_commands: int = 0
    seconds: float = 0.0
    error: str | None = None

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> bool:
        return self.error is not None or self.count(Status.FAILED) > 0

    @property
    def changed_steps(self) -> list[StepResult]:
        return [r for r in self.results if r.status == Status.CHANGED]

    def failure(self) -> str | None:
        """One line naming what failed first (`host: role: step: why`), or None."""
        if self.error is not None:
            return self.error
        failed = next((r for r in self.results if r.status == Status.FAILED), None)
        return f"{self.host}: {failed.role}: {failed.step}: {failed.summary}" if failed else None

    def summary(self) -> dict:
        return {
            "ok": self.count(Status.OK),
            "changed": self.count(Status.CHANGED),
            "failed": self.count(Status.FAILED) + (1 if self.error else 0),
            "seconds": round(self.seconds, 3),
            "ssh_commands": self.ssh_commands,
            "roles": {k: round(v, 3) for k, v in self.role_seconds.items()},
            "error": self.error,
        }


_COLORS = {Status.OK: "32", Status.CHANGED: "33", Status.FAILED: "31"}


class Reporter:
    """Prints step lines as they finish (thread-safe); `json_mode` prints only the end."""

    def __init__(
        self, stream: TextIO | None = None, *, json_mode: bool = False, check: bool = False
    ) -> None:
        self.stream = stream or sys.stdout
        self.json_mode = json_mode
        self.check = check
        self.color = self.stream.isatty()
        self._lock = threading.Lock()

    def _paint(self, status: Status, text: str) -> str:
        return f"\033[{_COLORS[status]}m{text}\033[0m" if self.color else text

    def _write(self, text: str) -> None:
        with self._lock:
            print(mask(text), file=self.stream, flush=True)

    def step(self, result: StepResult) -> None:
        if self.json_mode:
            return
        label = result.status.value
        if result.status == Status.CHANGED and self.check:
            label = "would change"
        detail = f": {result.summary}" if result.summary else ""
        line = (
            f"{result.host:<12} {result.role:<14} {self._paint(result.status, f'{label:<8}')} "
            f"{result.step}{detail}  ({result.seconds:.2f}s)"
        )
        if result.diff:
            line += "\n" + result.diff.rstrip("\n")
        self._write(line)

    def recap(self, recaps: list[HostRecap]) -> None:
        if self.json_mode:
            payload = {
                "check": self.check,
                "recap": {r.host: r.summary() for r in recaps},
                "hosts": {
                    r.host: [
                        {k: v for k, v in asdict(s).items() if k != "host" and v is not None}
                        for s in r.results
                    ]
                    for r in recaps
                },
            }
            self._write(json.dumps(payload, default=str))
            return
        lines = ["", "RECAP" + (" (check mode: nothing was changed)" if self.check else "")]
        for r in recaps:
            s = r.summary()
            roles = ", ".join(f"{k} {v:.2f}s" for k, v in r.role_seconds.items())
            lines.append(
                f"{r.host:<12} ok={s['ok']:<3} changed={s['changed']:<3} failed={s['failed']:<3} "
                f"{r.seconds:.2f}s, {r.ssh_commands} SSH commands"
                + (f"  [{roles}]" if roles else "")
            )
            if r.error:
                lines.append(f"{'':<12} error: {r.error}")
        self._write("\n".join(lines))
