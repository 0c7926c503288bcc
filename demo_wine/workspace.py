"""Put the shipped notebooks into a user's workspace, never over the user's own edits.

    python -m demo_wine.workspace WORKSPACE

Runs as the workspace's owner (Jupyter's unit runs it before Jupyter starts). Each notebook
shipped in demo_wine/notebooks goes to WORKSPACE/notebooks: copied when missing; replaced by
the shipped version when the copy is still exactly what was put there last time (the sha256s
are kept in WORKSPACE/notebooks/.shipped.json); otherwise the user's copy stays and the new
version lands beside it as NAME.new.ipynb. So a new release of the demo reaches users without
losing their work.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "notebooks"
RECORD = ".shipped.json"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def seed(workspace: Path, shipped: Path = SHIPPED) -> list[str]:
    """Bring the shipped notebooks into `workspace`; one line per thing done."""
    target = workspace / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    record_path = target / RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    done = []
    for source in sorted(shipped.glob("*.ipynb")):
        data = source.read_bytes()
        new = hashlib.sha256(data).hexdigest()
        copy = target / source.name
        if copy.is_symlink() or (copy.exists() and not copy.is_file()):
            done.append(f"{copy}: not a file, left alone")
            continue
        if not copy.exists():
            write_atomically(copy, data)
            done.append(f"{copy}: copied")
        elif digest(copy) == new:
            pass
        elif digest(copy) == record.get(source.name):  # untouched since we put it there
            write_atomically(copy, data)
            done.append(f"{copy}: updated to the shipped version")
        else:
            beside = copy.with_suffix(".new.ipynb")
            write_atomically(beside, data)
            done.append(f"{copy}: yours is kept; the shipped version is {beside.name}")
            continue
        record[source.name] = new
    write_atomically(record_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m demo_wine.workspace WORKSPACE", file=sys.stderr)
        return 2
    for line in seed(Path(args[0])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
