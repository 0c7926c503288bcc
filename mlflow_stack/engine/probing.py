"""Facts probes over SSH, and the prefetch that starts one before the roles are built.

A run reads every fact its steps need from the host; which facts those are is only known
once the roles have built their steps (from the base facts). `Prefetch` starts the probe
early with the facts the last run on this host read (their keys, kept in `plan_dir()`): the
host works while the controller imports and builds. A plan holds keys only, never command
text: each key is rebuilt into its fact by this code (`facts.from_key`, which refuses unknown
kinds, ad-hoc `Shell` snippets and arguments the code would not produce), so a tampered plan
can at worst make the prefetch read something needless, and the cache directory is used only
while it is this user's alone (`user_cache`). The values are always read in this run; the plan
only chooses what to read. A fact not in the plan (or not rebuildable) is probed after the
build, so a wrong plan costs one more probe, no more.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_stack.engine import probe_script, user_cache
from mlflow_stack.engine.link import HostError

if TYPE_CHECKING:
    from mlflow_stack.engine import facts as F
    from mlflow_stack.engine.host import Host

KEEP_PLANS = 64
PLAN_VERSION = 2  # a plan of fact keys (version 1 kept command text: never read)
MAX_PLAN = 512  # facts per plan at most
SUDO_PASSWORD_HINTS = ("a password is required", "a terminal is required")
# key -> (command, output, exit code) of facts already read in this run
Known = dict[str, tuple[str, str, int]]


def raw_probe(host: Host, facts: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """Run the commands of `facts` ((key, command) pairs) in one SSH command (as root):
    (output, exit code) of each, in order. Path facts share one `stat` and one `sha256sum`."""
    if not facts:
        return []
    batched = {i: _batched_path(*pair) for i, pair in enumerate(facts)}
    paths = [(i, path) for i, path in batched.items() if path is not None]
    singles = [i for i, path in batched.items() if path is None]
    commands = [facts[i][1] for i in singles]
    if paths:
        commands.append(probe_script.path_batch_command([p for _, p in paths]))
    script, marker = probe_script.script(commands)
    result = host.run("sh -s", stdin=script, timeout=120)
    if not result.ok and any(h in result.stderr for h in SUDO_PASSWORD_HINTS):
        raise HostError(
            f"{host.name}: sudo needs a password for {host.target.user}; allow passwordless "
            "sudo (NOPASSWD in /etc/sudoers.d) or log in as root"
        )
    try:
        outputs = probe_script.split_probe(result.stdout, marker, len(commands))
    except ValueError as exc:
        detail = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise HostError(f"{host.name}: gathering facts failed ({exc}): {detail[0]}") from None
    values: list[tuple[str, int]] = [("", 0)] * len(facts)
    for index, output in zip(singles, outputs, strict=False):
        values[index] = output
    if paths:  # its exit code is sha256sum's: a file gone meanwhile just has no digest
        split = probe_script.split_path_batch(outputs[-1][0], [p for _, p in paths])
        for index, path in paths:
            values[index] = (split[path], 0)
    return values


def _batched_path(key: str, command: str) -> str | None:
    """The path of a standard `PathState` fact that can join the batch, else None."""
    kind, _, path = key.partition(":")
    if kind != "path" or not probe_script.path_batchable(path):
        return None
    return path if command == probe_script.path_command(path) else None


def probe(host: Host, facts: list[F.Fact], known: Known | None = None) -> dict[str, Any]:
    """Values of `facts`: parsed from `known` when read there by the same command, the rest
    gathered in one SSH command."""
    unique = list({f.key: f for f in facts}.values())
    known = known or {}
    values: dict[str, Any] = {}
    missing: list[F.Fact] = []
    for fact in unique:
        hit = known.get(fact.key)
        if hit is not None and hit[0] == fact.command():
            values[fact.key] = fact.parse(hit[1], hit[2])
        else:
            missing.append(fact)
    outputs = raw_probe(host, [(f.key, f.command()) for f in missing])
    for fact, (text, rc) in zip(missing, outputs, strict=True):
        values[fact.key] = fact.parse(text, rc)
    return values


def plan_dir() -> Path:
    """Where plans are kept: `$XDG_CACHE_HOME/mlflow-stack/plans` (~/.cache by default)."""
    return user_cache.cache_dir("plans")


def plan_path(host: Host, roles: tuple[str, ...] | list[str]) -> Path:
    """The plan file of `host` run with `roles`."""
    t = host.target
    ident = "\0".join([t.name, t.user, t.address, str(t.port), *sorted(roles)])
    return plan_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"


def plan_keys(facts: list[F.Fact]) -> list[str]:
    """The keys a plan keeps: each rebuildable fact once, in order."""
    return list(dict.fromkeys(f.key for f in facts if f.rebuildable))[:MAX_PLAN]


def load_plan(path: Path) -> list[F.Fact]:
    """The planned facts, rebuilt from their keys by this code (a key it cannot rebuild is
    dropped); empty when there is no usable plan."""
    from mlflow_stack.engine import facts as F

    data = user_cache.read_json(path)
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        return []
    keys = data.get("facts")
    if not isinstance(keys, list):
        return []
    rebuilt = (F.from_key(key) for key in keys[:MAX_PLAN])
    return list({f.key: f for f in rebuilt if f is not None}.values())


def save_plan(path: Path, facts: list[F.Fact]) -> None:
    """Keep the keys of `facts` for the next run (private, written atomically)."""
    data = {"version": PLAN_VERSION, "facts": plan_keys(facts)}
    with contextlib.suppress(OSError):  # hosts not run for long (e.g. test sandboxes) drop out
        user_cache.write_json(path, data, KEEP_PLANS)


class Prefetch:
    """The planned facts of one host, probed in a background thread from construction on."""

    def __init__(self, host: Host, path: Path) -> None:
        self.host = host
        self.path = path
        self.planned = load_plan(path)
        self.started = time.monotonic()
        self._known: Known = {}
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        if self.planned:
            self._thread = threading.Thread(
                target=self._run, name=f"prefetch {host.name}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            pairs = [(f.key, f.command()) for f in self.planned]
            outputs = raw_probe(self.host, pairs)
            self._known = {
                key: (command, text, rc)
                for (key, command), (text, rc) in zip(pairs, outputs, strict=True)
            }
        except Exception as exc:  # raised again by `result()`, in the run's thread
            self._error = exc

    def result(self) -> Known:
        """The prefetched facts (empty without a plan); the probe's error if it failed."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._known

    def remember(self, facts: list[F.Fact]) -> None:
        """Save `facts` as the plan of the next run, if they differ from this run's plan."""
        if plan_keys(facts) != [f.key for f in self.planned]:
            save_plan(self.path, facts)


class FactStore:
    """The facts one run has read from its host, and how fresh they are.

    Every change the run makes bumps `generation`; a fact read before the current generation
    is stale. A role's facts are read again when stale; a live fact (a service's state) is
    read again before its step. The prefetched values (`known`) answer the first reads only.
    """

    def __init__(self, host: Host, known: Known | None = None) -> None:
        self.host = host
        self.known: Known = known or {}
        self.values: dict[str, Any] = {}
        self.generation = 0
        self._read_at: dict[str, int] = {}

    def read(self, facts: list[F.Fact]) -> None:
        """Probe `facts` (from the prefetch when it has them) into the values."""
        self.values.update(probe(self.host, facts, self.known))
        self._read_at.update((f.key, self.generation) for f in facts)

    def stale(self, facts: list[F.Fact], *, live_only: bool = False) -> list[F.Fact]:
        """Those of `facts` read before the host last changed (`live_only`: live ones)."""
        return [
            f
            for f in facts
            if (f.live or not live_only) and self._read_at.get(f.key, -1) < self.generation
        ]

    def changed_host(self) -> None:
        self.generation += 1
        self.known = {}  # values read before a change are not this host's any more
