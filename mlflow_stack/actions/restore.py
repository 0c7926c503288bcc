"""`invoke restore`: a backup onto a provisioned host (typically a new one).

Everything that can refuse does so before the host changes: the backup must be complete (a
manifest, written last) and every part must match its sha256; the host must run the backup's
backend and an MLflow at least as new as the one that made it (its schema revisions known to
the host's MLflow); a host that holds data of its own is refused unless `force`. Then the host
stops what writes (MLflow, its record service, gc, Jupyter, the warm runner), loads the
databases into fresh ones, puts the auth database, artifact store and workspace in place (each
written by its own account beside the live one, checked, then swapped in), migrates what is
older than its MLflow, starts what ran, and the counts are checked against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_stack.actions.backup import FORMAT, MANIFEST, agent_command, agent_failure
from mlflow_stack.actions.progress import Progress, human
from mlflow_stack.actions.remote import ActionError, last_json_line
from mlflow_stack.engine import streams
from mlflow_stack.engine.host import Host
from mlflow_stack.layout import Layout

# Counts a restored host must show within the manifest's [before, after] (the backup ran
# while the server did: append-only counts grew, if at all, between the two readings).
CHECKED = (
    "experiments",
    "runs",
    "params",
    "metrics",
    "tags",
    "registered_models",
    "model_versions",
    "aliases",
    "logged_models",
    "optuna_studies",
    "optuna_trials",
    "optuna_trial_values",
    "auth_users",
)


@dataclass
class Backup:
    """A complete backup directory, its manifest read and every part verified."""

    path: Path
    manifest: dict
    parts: dict[str, Path] = field(default_factory=dict)  # part key -> file

    @property
    def total(self) -> int:
        return sum(p.stat().st_size for p in self.parts.values())


def file_sha256(path: Path, progress: Progress | None = None, done: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in streams.file_chunks(path):
        digest.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress.update(done=done)
    return digest.hexdigest()


def load(path: Path, progress: Progress | None = None) -> Backup:
    """The backup in `path`, refused (one line) unless complete and every part intact."""
    where = f"backup {path}"
    if not path.is_dir():
        raise ActionError(f"{where}: no such directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = " (a backup that did not finish)" if path.name.endswith(".partial") else ""
        raise ActionError(f"{where}: not a complete backup: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        parts = manifest["parts"]
        assert isinstance(parts, dict) and manifest["format"] == FORMAT
    except (ValueError, KeyError, AssertionError, TypeError):
        raise ActionError(f"{where}: {MANIFEST} is unreadable or of another format") from None
    backup = Backup(path, manifest)
    for key, part in parts.items():
        file = path / part["name"]
        if not file.is_file():
            raise ActionError(f"{where}: part {part['name']} is missing")
        backup.parts[key] = file
    done = 0
    if progress is not None:
        progress.total = backup.total
    for key, file in backup.parts.items():
        if progress is not None:
            progress.update(phase=f"verifying {file.name}")
        expected = parts[key]
        if (
            file.stat().st_size != expected["bytes"]
            or file_sha256(file, progress, done) != (expected["sha256"])
        ):
            raise ActionError(
                f"{where}: part {file.name} is corrupt (its sha256 differs from the manifest); "
                "nothing was restored"
            )
        done += file.stat().st_size
    return backup


def version_key(version: str) -> tuple[int, ...]:
    """'3.17.2' -> (3, 17, 2); pre-release suffixes are ignored."""
    release = re.match(r"[\d.]+", version or "")
    return tuple(int(p) for p in release[0].split(".") if p) if release else ()


def host_data(info: dict) -> list[str]:
    """What the host holds of its own (a fresh host holds none of it)."""
    c = info.get("counts", {})
    held = [
        (c.get("runs", 0), "runs"),
        (c.get("experiments_beyond_default", 0), "experiments"),
        (c.get("registered_models", 0), "registered models"),
        (c.get("optuna_studies", 0), "Optuna studies"),
        (info.get("artifacts", {}).get("files", 0), "artifact files"),
        (max(0, c.get("auth_users", 0) - 1), "MLflow users besides admin"),
    ]
    return [f"{n} {what}" for n, what in held if n]


def refusals(backup: Backup, info: dict, host: str, force: bool) -> str | None:
    """Why the backup cannot go onto the host described by `info` (None: it can)."""
    m = backup.manifest
    if m["backend"] != info["backend"]:
        return (
            f"it runs the {info['backend']} backend and the backup is of {m['backend']}; "
            "provision the host with the backup's mlflow.backend"
        )
    newer = version_key(m["mlflow_version"]) > version_key(info["mlflow_version"])
    unknown = m["schema"] and m["schema"] not in info["revisions"]
    unknown_auth = m.get("auth_schema") and m["auth_schema"] not in info["auth_revisions"]
    if newer or unknown or unknown_auth:
        return (
            f"the backup was made by MLflow {m['mlflow_version']} (schema {m['schema']}), newer "
            f"than the host's MLflow {info['mlflow_version']}; upgrade the host first "
            "(invoke provision with the current pins)"
        )
    held = host_data(info)
    if held and not force:
        return (
            f"it holds data of its own ({', '.join(held)}); restoring replaces it: "
            "add --force to go ahead"
        )
    if not info.get("zstd") and any(p.get("compression") == "zstd" for p in m["parts"].values()):
        return f"it has no zstd to unpack the backup; run: invoke provision --host {host}"
    need = sum(p.get("raw_bytes", p["bytes"]) for p in m["parts"].values())
    if info.get("free_bytes", need * 2) < need * 1.2:
        return (
            f"it has {human(info['free_bytes'])} free, the backup unpacks to "
            f"{human(need)}: free some space first"
        )
    return None


@dataclass
class RestoreResult:
    host: str
    backup: Path
    finish: dict
    mismatches: list[str]
    seconds: float
    kept: list[str] = field(default_factory=list)
    admin: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds


def count_mismatches(manifest: dict, restored: dict) -> list[str]:
    """Counts outside the manifest's [before, after] bounds."""
    before, after = manifest["counts"]["before"], manifest["counts"]["after"]
    wrong = []
    for key in CHECKED:
        if key not in before or key not in restored:
            continue
        low, high = before[key], after.get(key, before[key])
        if not low <= restored[key] <= high:
            expected = str(low) if low == high else f"{low}..{high}"
            wrong.append(f"{key}: {restored[key]} restored, the backup holds {expected}")
    return wrong


def restore(
    host: Host,
    place: Layout,
    backup: Backup,
    *,
    force: bool = False,
    with_secrets: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Put `backup` onto `host` (see the module's docstring); refusals raise `ActionError`
    before anything on the host changed."""
    started = time.monotonic()
    m = backup.manifest
    inspected = host.run(agent_command(place, "inspect"))
    if not inspected.ok:
        raise agent_failure(host, inspected.rc, inspected.stderr, "cannot inspect the host")
    info = last_json_line(inspected.stdout) or {}
    refused = refusals(backup, info, host.name, force)
    if refused:
        raise ActionError(f"{host.name}: {refused}; nothing was changed")
    if with_secrets and "secrets" not in backup.parts:
        raise ActionError(
            f"backup {backup.path} holds no secrets (it was made without --with-secrets)"
        )

    def step(what: str, args: list[str], key: str | None = None) -> dict:
        begun = time.monotonic()
        try:
            return _step(what, args, key)
        finally:
            timings[key or args[0]] = round(time.monotonic() - begun, 2)

    def _step(what: str, args: list[str], key: str | None = None) -> dict:
        if key is None:
            result = host.run(agent_command(place, *args), timeout=900)
            out = result.stdout
        else:
            file = backup.parts[key]
            sent = [0]
            base = sum(p.stat().st_size for k, p in backup.parts.items() if k in done)

            def moved(n: int) -> None:
                sent[0] += n
                if progress is not None:
                    progress.update(done=base + sent[0], moved=base + sent[0])

            if progress is not None:
                progress.update(phase=file.name)
            lines: list[bytes] = []
            result = host.stream(
                agent_command(place, *args),
                sink=lines.append,
                source=streams.file_chunks(file, moved),
                timeout=1800,
            )
            out = b"".join(lines).decode(errors="replace")
            done.add(key)
        if result.rc != 0:
            raise agent_failure(host, result.rc, result.stderr, f"restore failed at {what}")
        return last_json_line(out) or {}

    done: set[str] = set()
    timings: dict[str, float] = {}
    if progress is not None:
        progress.total = backup.total
        progress.started = time.monotonic()
    step("stopping the writers", ["restore-begin"])
    parts = m["parts"]
    try:
        step(
            "the databases",
            [
                "restore-db",
                "--backend",
                m["backend"],
                "--compression",
                parts["databases"]["compression"],
            ],
            "databases",
        )
        admin = ""
        if "auth" in backup.parts:
            answer = step(
                "the auth database",
                ["restore-auth", "--compression", parts["auth"]["compression"]],
                "auth",
            )
            admin = answer.get("admin", "")
        kept = []
        for key in ("artifacts", "workspace"):
            if key not in backup.parts:
                continue
            part = parts[key]
            args = [
                "restore-tree",
                key,
                "--compression",
                part["compression"],
                "--files",
                str(part["files"]),
                "--bytes",
                str(part["file_bytes"]),
            ]
            if key == "workspace":
                args.append("--keep-previous")
            answer = step(f"the {key}", args, key)
            if answer.get("kept"):
                kept.append(answer["kept"])
        if with_secrets:
            step(
                "the secrets",
                ["restore-secrets", "--compression", parts["secrets"]["compression"]],
                "secrets",
            )
    except ActionError as exc:
        raise ActionError(
            f"{exc}; the host's MLflow, Jupyter and tuning services stay stopped: run the "
            "restore again"
        ) from None
    finally:
        if progress is not None:
            progress.finish()
    finish = step(
        "migrating and starting",
        [
            "restore-finish",
            "--port",
            str(place.mlflow_port),
            "--db-port",
            str(place.db_port),
            "--demo-python",
            place.demo_python,
        ],
    )
    mismatches = count_mismatches(m, finish.get("counts", {}))
    artifacts = parts.get("artifacts")
    if artifacts and finish.get("artifacts", {}).get("files") != artifacts["files"]:
        mismatches.append(
            f"artifact files: {finish['artifacts'].get('files')} restored, "
            f"the backup holds {artifacts['files']}"
        )
    return RestoreResult(
        host.name, backup.path, finish, mismatches, time.monotonic() - started, kept, admin, timings
    )


def summary(result: RestoreResult, backup: Backup) -> list[str]:
    """What `invoke restore` prints."""
    m, f = backup.manifest, result.finish
    lines = [
        f"restored {backup.path} (from {m['host']}, {m['created']}) onto {result.host} "
        f"in {result.seconds:.1f} s",
        "  " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
    ]
    if f.get("migrated"):
        lines.append(f"  schema migrated {f['schema_before']} -> {f['schema']}")
    if f.get("optuna", {}).get("was") and f["optuna"]["was"] != f["optuna"].get("optuna_alembic"):
        lines.append(f"  Optuna's storage upgraded to {f['optuna']['optuna_alembic']}")
    counts = f.get("counts", {})
    shown = [f"{counts[k]} {k}" for k in CHECKED if counts.get(k)]
    lines.append("  " + ", ".join(shown))
    if "artifacts" in f:
        a = f["artifacts"]
        lines.append(f"  artifacts: {a.get('files')} files, {human(a.get('bytes', 0))}")
    for path in result.kept:
        lines.append(f"  the host's previous workspace is kept in {path}")
    if result.admin == "set":
        lines.append("  MLflow's admin password is this host's own (`invoke urls` says where)")
    lines.append(
        "  counts match the backup's manifest"
        if not result.mismatches
        else "  COUNTS DIFFER: " + "; ".join(result.mismatches)
    )
    return lines
