"""Resolved `--host` values of a validated inventory, kept so that the next run skips YAML and
pydantic (≈ 0.15 s of every `invoke` start).

An entry is keyed by the inventory file's bytes, its path, the `--host` value and the source
of the validating code (`inventory.py`, `vars.py`): any edit is a miss. Only specs naming
inventory hosts and groups are kept (not `~/.ssh/config` aliases or ad-hoc addresses), with
each host's validated vars and how to reach it; a sandbox's address is read from its state on
every run, as without the cache. Entries live in `$XDG_CACHE_HOME/mlflow-stack/inventory`
(0700; files 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_stack.engine import user_cache
from mlflow_stack.engine.link import Target
from mlflow_stack.host_vars import HostVars
from mlflow_stack.targets import ResolvedHost, sandbox_target

if TYPE_CHECKING:
    from mlflow_stack.inventory import Inventory

HERE = Path(__file__).resolve().parent
SCHEMA_SOURCES = (
    "inventory.py", "vars.py", "host_vars.py", "inventory_cache.py", "layout.py", "targets.py"
)  # fmt: skip
KEEP = 64  # entries kept; the oldest go first


def cache_dir() -> Path:
    return user_cache.cache_dir("inventory")


def entry_path(path: Path, text: bytes, spec: str) -> Path:
    digest = hashlib.sha256()
    for name in SCHEMA_SOURCES:
        digest.update((HERE / name).read_bytes())
    for part in (str(path.resolve()).encode(), text, spec.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    return cache_dir() / f"{digest.hexdigest()[:32]}.json"


def lookup(path: Path, spec: str) -> list[ResolvedHost] | None:
    """The hosts `spec` resolved to in this very inventory before, or None."""
    try:
        entry = entry_path(path, path.read_bytes(), spec)
        data = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    try:
        return [_host(item, data["sections"]) for item in data["hosts"]] or None
    except (KeyError, TypeError, ValueError):
        return None


def _host(item: dict[str, Any], sections: list[str]) -> ResolvedHost:
    name = item["name"]
    if item.get("sandbox"):
        target = sandbox_target(name, item["sandbox"])
    else:
        key = item.get("key")
        target = Target(
            name, item["address"], int(item["port"]), item["user"],
            Path(key).expanduser() if key else None,
        )  # fmt: skip
    return ResolvedHost(
        name,
        target,
        tuple(item["roles"]),
        HostVars(item["vars"], tuple(sections)),
        tuple(item["groups"]),
        str(item.get("private_address", "")),
        tuple(item.get("workers", ())),
    )


def cacheable(spec: str, inv: Inventory) -> bool:
    """True if every part of `spec` names an inventory host or group."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    model = inv.model
    return bool(parts) and all(p in model.hosts or p in model.groups for p in parts)


def store(
    path: Path, text: bytes, spec: str, effective: str, inv: Inventory, hosts: list[ResolvedHost]
) -> None:
    """Keep how `spec` (`effective` once defaulted) resolved in the inventory `text`, read
    before `inv` was loaded from `path`; nothing when `effective` is not `cacheable` or the
    file changed meanwhile."""
    from mlflow_stack.vars import sections

    with contextlib.suppress(OSError):
        if path.read_bytes() != text or not cacheable(effective, inv):
            return
    workers = inv.model.groups.get("workers")
    if (
        any(h.workers for h in hosts)
        and workers
        and any(inv.model.hosts[w].sandbox for w in workers.hosts)
    ):
        return  # a worker sandbox's address is read live, like the host's own
    items = []
    for h in hosts:
        entry = inv.model.hosts[h.name]
        key = entry.key or inv.model.defaults.key
        reach = (
            {"sandbox": entry.sandbox}
            if entry.sandbox
            else {"address": h.target.address, "port": h.target.port, "user": h.target.user,
                  "key": str(key) if key else None}
        )  # fmt: skip
        dump = h.vars.as_dict()
        items.append(
            {
                "name": h.name,
                "roles": list(h.roles),
                "groups": list(h.groups),
                "private_address": h.private_address,
                "workers": list(h.workers),
                "vars": dump,
                **reach,
            }
        )
    data = {"sections": list(sections()), "hosts": items}
    with contextlib.suppress(OSError, TypeError, ValueError):
        user_cache.write_json(entry_path(path, text, spec), data, KEEP)
