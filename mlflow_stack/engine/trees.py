"""A local directory mirrored to the host: only differing files are sent, extras removed."""

from __future__ import annotations

import fnmatch
import shlex
from dataclasses import dataclass
from pathlib import Path

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import Change, Cmd, Directory, File, PlanContext, Step, root_only

EXCLUDE = ("__pycache__", "*.pyc", ".ipynb_checkpoints", "mlruns", "mlflow.db", ".DS_Store")


def local_files(root: Path, exclude: tuple[str, ...] = EXCLUDE) -> list[Path]:
    """Files under `root` (relative paths, sorted), skipping excluded names at any depth."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in exclude):
            continue
        if path.is_file():
            found.append(rel)
    return found


@dataclass
class PruneExtra(Step):
    """Remove files under `remote` that the local tree no longer has."""

    remote: str
    keep: frozenset[str]
    exclude: tuple[str, ...] = EXCLUDE
    notify: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.id = f"prune:{self.remote}"
        self.label = f"prune {self.remote}"

    def fact(self) -> F.Fact:
        return F.FilesUnder(self.remote)

    def facts(self) -> list[F.Fact]:
        return [self.fact()]

    def plan(self, ctx: PlanContext) -> Change | None:
        present = [line for line in ctx[self.fact()].output.splitlines() if line]
        extra = [
            p
            for p in present
            if p not in self.keep
            and not any(fnmatch.fnmatch(part, pat) for part in p.split("/") for pat in self.exclude)
        ]
        if not extra:
            return None
        paths = " ".join(shlex.quote(f"{self.remote}/{p}") for p in extra)
        return Change(
            f"removed {len(extra)} file(s): {', '.join(extra[:5])}",
            [Cmd(f"{root_only_tree(self.remote)}; rm -f {paths}")],
        )


def root_only_tree(remote: str) -> str:
    """Shell that stops (exit 3) unless root alone controls `remote` and everything in it."""
    r = shlex.quote(remote)
    return (
        f"{root_only(remote)}; "
        f"other=$(find {r} \\( ! -user root -o -perm /022 \\) -print -quit); "
        'if [ -n "$other" ]; then '
        "printf 'refusing to prune %s as root: %s is not root'\\''s alone\\n' "
        f'{r} "$other" >&2; exit 3; fi'
    )


def tree_steps(
    local: Path,
    remote: str,
    owner: str,
    group: str,
    notify: tuple[str, ...] = (),
    elsewhere: frozenset[str] = frozenset(),
) -> list[Step]:
    """Directories, files and a prune step making `remote` mirror `local`; a changed or
    removed file notifies the units in `notify`. Files in `elsewhere` (relative paths) are
    another step's: neither sent nor pruned."""
    files = [p for p in local_files(local) if str(p) not in elsewhere]
    dirs = sorted({str(p.parent) for p in files if str(p.parent) != "."})
    steps: list[Step] = [Directory(remote, owner, group, 0o755)]
    steps += [Directory(f"{remote}/{d}", owner, group, 0o755) for d in dirs]
    for rel in files:
        mode = 0o755 if (local / rel).stat().st_mode & 0o100 else 0o644
        data = (local / rel).read_bytes()
        steps.append(File(f"{remote}/{rel}", data, owner, group, mode, notify=notify))
    keep = frozenset(str(p) for p in files) | elsewhere
    steps.append(PruneExtra(remote, keep, notify=notify))
    return steps
