"""Resolved `--host` values of a validated inventory, kept so that the next run skips YAML and
pydantic (≈ 0.15 s of every `invoke` start).

An entry is keyed by the inventory file's bytes, its path, the `--host` value and the source
of the validating code (`SCHEMA_SOURCES`: every module the inventory's validation runs, which
a unit test keeps complete): any edit is a miss, so an entry is only used if it was validated
by this very code, and it records that code's digest, checked again on use. Only specs naming
inventory hosts and groups are kept (not `~/.ssh/config` aliases or ad-hoc addresses), with
each host's validated vars, how to reach it and its host key settings; a sandbox's address is
read from its state on every run, as without the cache. The connection fields are checked
once more on use (`inputs`, no pydantic), and the entries live in
`$XDG_CACHE_HOME/mlflow-stack/inventory` (0700, files 0600, used only while nobody else can
write them: `engine.user_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_stack import inputs
from mlflow_stack.engine import hostkeys, user_cache
from mlflow_stack.engine.link import Target
from mlflow_stack.host_vars import HostVars
from mlflow_stack.targets import ResolvedHost, sandbox_target

if TYPE_CHECKING:
    from mlflow_stack.inventory import Inventory

HERE = Path(__file__).resolve().parent
SCHEMA_SOURCES = (
    "inventory.py", "vars.py", "host_vars.py", "inventory_cache.py", "layout.py", "targets.py",
    "inputs.py", "errors.py", "engine/hostkeys.py", "engine/link.py", "engine/host.py",
    "secrets.py",
)  # fmt: skip
KEEP = 64  # entries kept; the oldest go first


def cache_dir() -> Path:
    return user_cache.cache_dir("inventory")


def code_digest() -> str:
    """The digest of the validating code (`SCHEMA_SOURCES`)."""
    digest = hashlib.sha256()
    for name in SCHEMA_SOURCES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


def entry_path(path: Path, text: bytes, spec: str, code: str | None = None) -> Path:
    digest = hashlib.sha256((code or code_digest()).encode())
    for part in (str(path.resolve()).encode(), text, spec.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    return cache_dir() / f"{digest.hexdigest()[:32]}.json"


def lookup(path: Path, spec: str) -> list[ResolvedHost] | None:
    """The hosts `spec` resolved to in this very inventory, validated by this very code,
    before; else None."""
    try:
        code = code_digest()
        data = user_cache.read_json(entry_path(path, path.read_bytes(), spec, code))
    except OSError:
        return None
    if not isinstance(data, dict) or data.get("code") != code:
        return None
    try:
        return [_host(item, data["sections"]) for item in data["hosts"]] or None
    except (KeyError, TypeError, ValueError):
        return None


def _host(item: dict[str, Any], sections: list[str]) -> ResolvedHost:
    name = inputs.name(item["name"], "cached host")
    if item.get("sandbox"):
        target = sandbox_target(name, inputs.name(item["sandbox"], "cached sandbox"))
    else:
        key, known = item.get("key"), item.get("known_hosts")
        policy = item.get("host_key_policy")
        if policy not in (None, *hostkeys.POLICIES):
            raise ValueError(f"cached host key policy {policy!r}")
        target = Target(
            name,
            inputs.host_address(item["address"], "cached address"),
            inputs.whole_number(item["port"], "cached port", 1, 65535),
            inputs.login_user(item["user"], "cached user"),
            Path(inputs.local_path(key, "cached key")).expanduser() if key else None,
            Path(inputs.local_path(known, "cached known_hosts")) if known else None,
            tuple(hostkeys.pin_text(p) for p in item.get("host_keys", [])),
            policy,
        )
    inputs.no_control(item["vars"])
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
        t = h.target
        reach = (
            {"sandbox": entry.sandbox}
            if entry.sandbox
            else {"address": t.address, "port": t.port, "user": t.user,
                  "key": str(key) if key else None,
                  "known_hosts": str(t.known_hosts) if t.known_hosts else None,
                  "host_keys": list(t.host_keys), "host_key_policy": t.host_key_policy}
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
    code = code_digest()
    data = {"code": code, "sections": list(sections()), "hosts": items}
    with contextlib.suppress(OSError, TypeError, ValueError):
        user_cache.write_json(entry_path(path, text, spec, code), data, KEEP)
