"""Small private JSON files in this user's cache, `$XDG_CACHE_HOME/mlflow-stack/<kind>`.

What is read back decides what a run does (which facts to probe, how a `--host` resolved),
so a cache is only used while nobody else can write it: `mlflow-stack/` and `<kind>/` must be
directories (not symlinks) of this user, writable by no group or other user, and each file
too. Otherwise the cache is ignored, with a warning saying why (once per process), and the
run goes the slow way.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

_warned: set[str] = set()
_lock = threading.Lock()


def cache_dir(kind: str) -> Path:
    """`$XDG_CACHE_HOME/mlflow-stack/<kind>` (~/.cache by default); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlflow-stack" / kind


def _unsafe(info: os.stat_result, want_dir: bool) -> str | None:
    """Why a cache entry with this lstat is not safe to use, or None."""
    kind_ok = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        return "not a directory" if want_dir else "not a regular file"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by you"
    if info.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _warn(path: Path, why: str) -> None:
    with _lock:
        if str(path) in _warned:
            return
        _warned.add(str(path))
    print(
        f"warning: cache {path} is {why}: not used (runs take the slow way); "
        f"remove it, or make it yours with mode 0700",
        file=sys.stderr,
        flush=True,
    )


def usable(directory: Path) -> bool:
    """True if `directory` and its parent (`mlflow-stack/`) are safe to read and write, or
    do not exist yet (they are made 0700); else warns once and returns False."""
    for path in (directory.parent, directory):
        try:
            info = path.lstat()
        except FileNotFoundError:
            return True
        except OSError as exc:
            _warn(path, f"unreadable ({exc.strerror})")
            return False
        why = _unsafe(info, want_dir=True)
        if why:
            _warn(path, why)
            return False
    return True


def read_json(path: Path) -> Any | None:
    """The JSON in `path` if it and its directories are this user's alone; else None."""
    if not usable(path.parent):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        why = _unsafe(os.fstat(handle.fileno()), want_dir=False)
        if why:
            _warn(path, why)
            return None
        try:
            return json.load(handle)
        except ValueError:
            return None


def write_json(path: Path, data: Any, keep: int) -> None:
    """Write `data` to `path` atomically (0600, its directory 0700), then keep only the
    `keep` newest `*.json` files beside it. Nothing when the directory is not safely this
    user's. Errors (OSError, unserialisable data) propagate."""
    if not usable(path.parent):
        return
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)
    files = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
