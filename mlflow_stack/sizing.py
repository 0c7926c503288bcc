"""The stack's size, chosen from the host's memory and CPUs (`sizing.profile` overrides it).

`small` is the original walkthrough's instance (1 vCPU, 1 GiB): database buffers and
connection limits cut down, the warm runner started on demand and stopped when idle, fewer
malloc arenas in the Python services. `standard` is everything else. Figures: BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow_stack.engine.facts import HostSize

SMALL_BELOW = 2 * 2**30  # hosts with less memory than this get the small profile
PROFILES = ("small", "standard")
WARM_IDLE_S = 600  # small: the warm runner exits after this long without a run


@dataclass(frozen=True)
class Sizing:
    profile: str  # one of PROFILES
    size: HostSize

    @classmethod
    def of(cls, size: HostSize, choice: str = "auto") -> Sizing:
        """`choice` (auto, small or standard) for a host of `size`."""
        if choice == "auto":
            choice = "small" if size.memory_bytes < SMALL_BELOW else "standard"
        if choice not in PROFILES:
            raise ValueError(f"sizing profile {choice!r}: choose auto, small or standard")
        return cls(choice, size)

    @property
    def small(self) -> bool:
        return self.profile == "small"

    def tracking_workers(self, wanted: int | None) -> int:
        """The tracking server's uvicorn workers: as set, else one per two CPUs (at most 4;
        one on the small profile, where each is ≈ 300 MB)."""
        if wanted is not None:
            return wanted
        return 1 if self.small else max(1, min(4, self.size.cpus // 2))

    def warm_runner(self, wanted: bool | None) -> str:
        """`always` (a resident process), `on-demand` (started by its socket, stopped when
        idle) or `off`, as set (True: always) or by profile."""
        if wanted is False:
            return "off"
        if wanted is None and self.small:
            return "on-demand"
        return "always"

    @property
    def malloc_arenas(self) -> int | None:
        """MALLOC_ARENA_MAX for the Python services: glibc's default (8 per CPU) lets threads
        hold memory in arenas of their own, too much for 1 GiB."""
        return 2 if self.small else None

    def describe(self) -> str:
        return f"{self.profile} ({self.size.cpus} CPU, {self.size.memory_gib:.1f} GiB)"
