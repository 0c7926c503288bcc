"""What `invoke status` says about the data: database, artifact and workspace sizes, the
upgrade backups kept on the host, the free disk, and a warning below `disk.warn_free_below`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlflow_stack import layout
from mlflow_stack.actions.progress import human
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.probing import probe

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host
    from mlflow_stack.host_vars import HostVars

MYSQL_DATA = "/var/lib/mysql"
UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'2GB', '500 MiB', '1.5G', '4096' -> bytes (k/M/G/T decimal, with i binary)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not found:
        raise ValueError(f"not a size: {text!r}")
    number, unit, binary = float(found[1]), found[2].lower(), found[3]
    base = 1024 ** "kmgt".index(unit) * 1024 if binary and unit else UNITS[unit]
    return int(number * base)


def _du(name: str, path: str) -> F.Shell:
    # apparent sizes, no symlink followed (du never does); nothing when the path is missing
    return F.Shell(name, f"[ -e {path} ] && du -s -B1 --apparent-size {path} | cut -f1")


def size_facts(backend: str) -> dict[str, F.Shell]:
    facts = {
        "artifacts": _du("artifacts size", layout.MLFLOW_ARTIFACTS),
        "workspace": _du("workspace size", layout.DEMO_WORKSPACE),
        "upgrade backups": _du("upgrade backups size", layout.UPGRADE_BACKUPS),
        "auth db": _du("auth db size", layout.MLFLOW_AUTH_DB),
        "disk": F.Shell(
            "free disk",
            f"df -B1 --output=avail,size,target {layout.MLFLOW_STATE} "
            f"$([ -d {MYSQL_DATA} ] && echo {MYSQL_DATA}) | tail -n +2",
        ),
    }
    if backend == "sqlite":
        facts["database mlflow"] = _du("sqlite size", layout.MLFLOW_SQLITE)
    else:
        names = ", ".join(f"'{db}'" for db in layout.DATABASES)
        facts["databases"] = F.Shell(
            "database sizes",
            'mysql -N -B -e "SELECT table_schema, SUM(data_length + index_length) '
            f'FROM information_schema.tables WHERE table_schema IN ({names}) GROUP BY 1"',
        )
    return facts


@dataclass
class Disk:
    mount: str
    free: int
    size: int


@dataclass
class Usage:
    sizes: dict[str, int] = field(default_factory=dict)
    disks: list[Disk] = field(default_factory=list)
    warn_below: int = 0

    @property
    def low(self) -> list[Disk]:
        return [d for d in self.disks if d.free < self.warn_below]


def parse(values: dict[str, F.ShellResult], warn_below: int) -> Usage:
    usage = Usage(warn_below=warn_below)
    for name, result in values.items():
        text = result.output.strip() if result.ok else ""
        if name == "disk":
            seen = set()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0].isdigit() and parts[2] not in seen:
                    seen.add(parts[2])
                    usage.disks.append(Disk(parts[2], int(parts[0]), int(parts[1])))
        elif name == "databases":
            for line in text.splitlines():
                db, _, size = line.partition("\t")
                if size.strip().isdigit():
                    usage.sizes[f"database {db}"] = int(size)
        elif text.isdigit():
            usage.sizes[name] = int(text)
    return usage


def gather(host: Host, host_vars: HostVars) -> Usage:
    """Sizes and free disk in one probe (one SSH command)."""
    facts = size_facts(host_vars.mlflow.backend)
    values = probe(host, list(facts.values()))
    return parse(
        {name: values[fact.key] for name, fact in facts.items()},
        parse_size(host_vars.disk.warn_free_below),
    )


def render(usage: Usage) -> list[str]:
    order = ["database mlflow", "database optuna", "auth db", "artifacts", "workspace"]
    order += [k for k in usage.sizes if k not in order]
    shown = ", ".join(f"{k} {human(usage.sizes[k])}" for k in order if k in usage.sizes)
    lines = [f"  data: {shown}" if shown else "  data: nothing yet"]
    for disk in usage.disks:
        lines.append(f"  disk: {human(disk.free)} free of {human(disk.size)} on {disk.mount}")
    for disk in usage.low:
        lines.append(
            f"  WARNING: {human(disk.free)} free on {disk.mount}, below "
            f"{human(usage.warn_below)} (disk.warn_free_below): MLflow and the database stop "
            "when it fills; delete runs (gc removes them), drop old upgrade backups in "
            f"{layout.UPGRADE_BACKUPS}, or grow the disk"
        )
    return lines
