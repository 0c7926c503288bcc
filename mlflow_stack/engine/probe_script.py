"""The probe's shell: many read-only commands in one script, and its output cut back apart.

Light on purpose (no fact classes): the prefetch builds its probe from stored commands
before the roles, steps and facts are imported.
"""

from __future__ import annotations

import secrets as _random
import shlex

_BATCH_SPLIT = "@@sha256"


def path_command(path: str) -> str:
    """What `PathState` runs: `stat` of the path and, for a regular file, its sha256."""
    p = shlex.quote(path)
    return (
        f"if [ -e {p} ] || [ -L {p} ]; then stat -c '%F|%a|%U|%G|%s' {p}; "
        f"if [ -f {p} ] && [ ! -L {p} ]; then sha256sum {p}; fi; fi"
    )


def path_batchable(path: str) -> bool:
    """Paths whose `stat`/`sha256sum` lines are unambiguous (no newline or backslash)."""
    return "\n" not in path and "\\" not in path


def path_batch_command(paths: list[str]) -> str:
    """One `stat` and one `sha256sum` for many paths (instead of two processes each)."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    return (
        f'set --; for p in {quoted}; do if [ -e "$p" ] || [ -L "$p" ]; then '
        'set -- "$@" "$p"; fi; done; '
        "[ $# -eq 0 ] || stat -c '%F|%a|%U|%G|%s|%n' -- \"$@\"; "
        f"echo '{_BATCH_SPLIT}'; "
        'for p in "$@"; do shift; if [ -f "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; '
        'fi; done; [ $# -eq 0 ] || sha256sum -- "$@"'
    )


def split_path_batch(output: str, paths: list[str]) -> dict[str, str]:
    """Each path's output as its own `command()` prints it, from `path_batch_command`'s."""
    stats, _, sums = output.partition(_BATCH_SPLIT + "\n")
    head: dict[str, str] = {}
    for line in stats.splitlines():
        parts = line.split("|", 5)
        if len(parts) == 6:
            head[parts[5]] = "|".join(parts[:5])
    digests = {}
    for line in sums.splitlines():
        digest, sep, name = line.partition("  ")
        if sep:
            digests[name] = digest
    out = {}
    for path in paths:
        text = f"{head[path]}\n" if path in head else ""
        if path in head and path in digests:
            text += f"{digests[path]}  {path}\n"
        out[path] = text
    return out


def script(commands: list[str], marker: str | None = None) -> tuple[str, str]:
    """One shell script that runs `commands`, with markers around each output.

    The commands run concurrently (they only read), each framed into its own file in a temp
    directory; once all are done the files are printed in order, so the output is the same
    as running them one after the other.
    """
    marker = marker or f"@@probe-{_random.token_hex(8)}"
    width = len(str(max(len(commands) - 1, 0)))
    # The script itself arrives on stdin (`sh -s`): each command gets /dev/null as its stdin
    # so that no command can swallow the rest of the script.
    lines = [
        "exec 2>/dev/null",
        "export LC_ALL=C",
        "d=$(mktemp -d || mktemp -d -p /dev/shm) || exit 97",
        "trap 'rm -rf \"$d\"' EXIT",
    ]
    for index, command in enumerate(commands):
        lines.append(
            f"{{ echo '{marker} {index}'; ( {command}\n) </dev/null; "
            f"printf '\\n{marker} end %s\\n' $?; }} >\"$d/{index:0{width}d}\" &"
        )
    lines += ["wait", 'cat "$d"/*']
    return "\n".join(lines) + "\n", marker


def split_probe(output: str, marker: str, count: int) -> list[tuple[str, int]]:
    """Cut probe output back into (output, exit code) per fact, in order."""
    results: list[tuple[str, int] | None] = [None] * count
    current: int | None = None
    buffer: list[str] = []
    for line in output.split("\n"):
        if line.startswith(marker + " "):
            rest = line[len(marker) + 1 :]
            if rest.startswith("end ") and current is not None:
                results[current] = ("\n".join(buffer), int(rest[4:]))
                current, buffer = None, []
                continue
            if rest.isdigit():
                current, buffer = int(rest), []
                continue
        if current is not None:
            buffer.append(line)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ValueError(f"probe output is incomplete: no result for fact(s) {missing}")
    return [r for r in results if r is not None]
