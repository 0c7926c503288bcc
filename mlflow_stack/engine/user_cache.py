"""Small private JSON files in this user's cache, `$XDG_CACHE_HOME/mlflow-stack/<kind>`."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir(kind: str) -> Path:
    """`$XDG_CACHE_HOME/mlflow-stack/<kind>` (~/.cache by default); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlflow-stack" / kind


def write_json(path: Path, data: Any, keep: int) -> None:
    """Write `data` to `path` atomically (0600, its directory 0700), then keep only the
    `keep` newest `*.json` files beside it. Errors (OSError, unserialisable data) propagate."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)
    files = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
