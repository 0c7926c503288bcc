"""Debian distributions a sandbox can run, and what each needs that the others do not.

Facts measured on the project's machines (cgroup v1 hierarchies, a fixed snapshot of Debian's
archive):

- bookworm (systemd 252) and trixie (systemd 257) boot under the controller's cgroup v1
  hierarchy as they are; sid (systemd 262) refuses ("Detected unsupported legacy cgroup
  hierarchy") and boots with `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1` in nspawn's environment,
  so only sid gets it.
- sid's Release file carries a Valid-Until that the snapshot is past, so apt inside needs
  `Acquire::Check-Valid-Until "false"`; bookworm's and trixie's carry none. That is a property
  of the test archive, written into the image only for the suite that needs it.
- The recipe's package list exists under the same names in all three suites.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .base import SandboxError

DISTRO_ENV = "MLFLOW_STACK_SANDBOX_DISTRO"
DEFAULT_DISTRO = "bookworm"
APT_CONF = "/etc/apt/apt.conf.d/90-sandbox-archive-snapshot"


@dataclass(frozen=True)
class Distro:
    """One Debian suite as a sandbox image."""

    suite: str
    version: str  # for messages: "Debian 12"
    unified_hierarchy: bool = False  # its systemd needs cgroup v2 inside the container
    stale_release: bool = False  # the archive's Release is past Valid-Until

    @property
    def prefix(self) -> str:
        """Start of this suite's cache entries (tarballs and bases)."""
        return f"debian-{self.suite}"

    def nspawn_env(self) -> dict[str, str]:
        """Extra environment of systemd-nspawn for this suite."""
        return {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"} if self.unified_hierarchy else {}

    def image_files(self) -> dict[str, str]:
        """Files the suite needs in its image beyond the common recipe (path -> content)."""
        if not self.stale_release:
            return {}
        return {
            APT_CONF: (
                "// The reachable Debian archive is a fixed snapshot whose Release file is past\n"
                "// its Valid-Until date (a property of the test archive, not of real hosts).\n"
                'Acquire::Check-Valid-Until "false";\n'
            )
        }


DISTROS = {
    "bookworm": Distro("bookworm", "Debian 12"),
    "trixie": Distro("trixie", "Debian 13"),
    "sid": Distro("sid", "Debian sid", unified_hierarchy=True, stale_release=True),
}


def default_distro() -> str:
    """The suite used when none is asked for ($MLFLOW_STACK_SANDBOX_DISTRO or bookworm)."""
    return os.environ.get(DISTRO_ENV) or DEFAULT_DISTRO


def get(name: str | None = None) -> Distro:
    """The Distro called `name` (default: default_distro()); SandboxError if unknown."""
    name = name or default_distro()
    try:
        return DISTROS[name]
    except KeyError:
        raise SandboxError(
            f"unknown distribution {name!r}: choose one of {', '.join(DISTROS)}"
        ) from None
