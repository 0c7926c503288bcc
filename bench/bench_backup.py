"""Backup and restore of a host with >= 10,000 runs and >= 1 GB of artifacts, beside the raw
`ssh host cat` throughput of the same bytes, measured in the same run.

    .venv/bin/python bench/bench_backup.py [--runs 10000] [--artifact-runs 2500] [--kb 420]
                                           [--levels 1,0] [--keep] [--reuse]

The host is a sandbox of its own (`--name`, default backup-bench, on the private network;
an existing one is used only with --reuse, never taken down otherwise) provisioned at the
defaults, filled on the host by bench/bulk_fill.py (runs by direct SQL, artifacts written
straight into the store).
"The same bytes" are what a backup reads at its sources: every artifact file and the SQL dump
of both databases (made once into /var/tmp for this measurement). Raw down: `ssh host 'cat
<them>'` into a local file; raw up: that file into `ssh host 'cat > /dev/null'`. Backup:
`invoke backup` as a user runs it (process start to exit), at each zstd level asked for.
Restore: `invoke restore --force` of the level-1 backup onto the same host (drop, load, put in
place, migrate if needed, start, count). MB/s are of the source bytes (decimal MB).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from stack import REPO, invoke

from mlflow_stack import sandbox

DUMP = "/var/tmp/bench-dump.sql"
MLFLOW_PY = "/opt/anaconda/envs/mlflow/bin/python"


def ssh(info, command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(info.ssh_command(f"sudo -n sh -c {shlex.quote(command)}"), **kwargs)


def out(info, command: str, stdin: str | None = None) -> str:
    proc = ssh(info, command, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{command[:60]}…: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def fill(info, runs: int, artifact_runs: int, kb: int) -> None:
    script = (REPO / "bench" / "bulk_fill.py").read_text()
    out(info, "install -m 0644 /dev/stdin /var/tmp/bulk_fill.py", stdin=script)
    started = time.perf_counter()
    listed = out(info, f"cd / && {MLFLOW_PY} /var/tmp/bulk_fill.py db --runs {runs}")
    db_seconds = time.perf_counter() - started
    chosen = "\n".join(listed.splitlines()[:artifact_runs]) + "\n"
    started = time.perf_counter()
    out(
        info,
        f"cd / && runuser -u mlflow -- {MLFLOW_PY} /var/tmp/bulk_fill.py files --kb {kb}",
        stdin=chosen,
    )
    print(
        f"filled: {runs} runs by SQL in {db_seconds:.1f} s, artifacts of {artifact_runs} runs "
        f"in {time.perf_counter() - started:.1f} s"
    )


def run_count(info) -> int:
    text = out(info, 'mysql -N -e "SELECT COUNT(*) FROM mlflow.runs"').strip()
    return int(text or 0)


def payload(info) -> tuple[list[str], int, int]:
    """The source files (artifacts + a dump made for the purpose), their bytes, file count."""
    out(
        info,
        "mysqldump --single-transaction --quick --routines --triggers --events --hex-blob "
        f"--databases mlflow optuna > {DUMP}",
    )
    listing = out(
        info,
        f"find /var/lib/mlflow/artifacts -type f -printf '%s %p\\n'; stat -c '%s %n' {DUMP}",
    )
    files, total = [], 0
    for line in listing.splitlines():
        size, _, path = line.partition(" ")
        files.append(path)
        total += int(size)
    return files, total, len(files) - 1


def timed(info, command: str, what: str, **streams) -> float:
    """Wall seconds of one `ssh host COMMAND` with `streams` (stdin, stdout)."""
    started = time.perf_counter()
    proc = ssh(info, command, **streams)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed")
    return time.perf_counter() - started


def raw_down(info, files: list[str], local: Path) -> float:
    """`ssh host cat FILES > local`: the same bytes, no tar, no compression, no hashing."""
    out(info, "cat > /var/tmp/bench-files", stdin="\n".join(files) + "\n")
    with open(local, "wb") as sink:
        return timed(info, "tr '\\n' '\\0' < /var/tmp/bench-files | xargs -0 cat", "raw cat",
                     stdout=sink)  # fmt: skip


def raw_up(info, local: Path) -> float:
    """`ssh host 'cat > /dev/null' < local`."""
    with open(local, "rb") as source:
        return timed(info, "cat > /dev/null", "raw upload", stdin=source)


def inventory(directory: Path, name: str) -> Path:
    path = directory / "inventory.yaml"
    path.write_text(
        f"groups:\n  server:\n    hosts: [bench]\nhosts:\n  bench:\n    sandbox: {name}\n"
    )
    return path


def provision(inv: Path) -> None:
    seconds, proc = invoke("provision", "--host", "bench", "--inventory", str(inv))
    if proc.returncode != 0:
        raise SystemExit(f"provision failed: {proc.stderr.strip()[-500:]}")
    print(f"provisioned in {seconds:.1f} s")


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f} MB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--artifact-runs", type=int, default=2_500)
    parser.add_argument("--kb", type=int, default=420, help="artifact kB per such run")
    parser.add_argument("--levels", default="1,0", help="zstd levels to back up with")
    parser.add_argument("--name", default="backup-bench", help="the sandbox's name")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox afterwards")
    parser.add_argument("--reuse", action="store_true", help="use the sandbox if it runs")
    args = parser.parse_args()
    info = sandbox.load(args.name)
    if info is not None and not args.reuse:
        raise SystemExit(f"sandbox {args.name} exists: --reuse it, or give another --name")
    if info is None:
        info = sandbox.up(args.name)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
            work = Path(tmp)
            inv = inventory(work, args.name)
            provision(inv)
            if run_count(info) < args.runs:
                fill(info, args.runs, args.artifact_runs, args.kb)
            files, nbytes, nfiles = payload(info)
            print(f"payload: {run_count(info)} runs, {nfiles} artifact files + the SQL dump, "
                  f"{nbytes / 1e9:.2f} GB")  # fmt: skip
            local = work / "payload.bin"
            down = raw_down(info, files, local)
            print(f"raw ssh cat, host -> here:   {down:6.1f} s  {rate(nbytes, down)}")
            made = {}
            for level in args.levels.split(","):
                seconds, proc = invoke(
                    "backup", "--host", "bench", "--inventory", str(inv), "--to",
                    str(work / f"level{level}"), "--level", level, "--quiet",
                )  # fmt: skip
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr.strip()[-800:])
                path = Path(re.search(r"^backup of bench: (\S+)$", proc.stdout, re.M)[1])
                manifest = json.loads((path / "manifest.json").read_text())
                sent = sum(p["bytes"] for p in manifest["parts"].values())
                made[level] = path
                print(
                    f"invoke backup --level {level}:    {seconds:6.1f} s  {rate(nbytes, seconds)}"
                    f"  ({seconds and down / seconds:.2f}x raw; {sent / 1e9:.2f} GB transferred)"
                )
            up = raw_up(info, local)
            print(f"raw ssh cat, here -> host:   {up:6.1f} s  {rate(nbytes, up)}")
            source = made.get("1") or next(iter(made.values()))
            seconds, proc = invoke(
                "restore", "--from", str(source), "--host", "bench", "--inventory", str(inv),
                "--force", "--quiet",
            )  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(proc.stderr.strip()[-800:])
            steps = proc.stdout.splitlines()[1].strip()
            print(
                f"invoke restore --force:     {seconds:6.1f} s  {rate(nbytes, seconds)}"
                f"  ({up / seconds:.2f}x raw)\n  steps: {steps}"
            )
            ssh(info, f"rm -f {DUMP} /var/tmp/bench-files /var/tmp/bulk_fill.py")
    finally:
        if not args.keep:
            sandbox.down(args.name)


if __name__ == "__main__":
    main()
