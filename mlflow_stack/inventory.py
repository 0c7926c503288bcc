"""`inventory.yaml`: hosts, groups and variables, validated once into typed objects.

`resolve()` turns a `--host` value into concrete targets: an inventory host or group, a
running sandbox, an `~/.ssh/config` alias, or `user@address[:port]`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mlflow_stack import inputs
from mlflow_stack import vars as schema
from mlflow_stack.engine import hostkeys
from mlflow_stack.engine.host import Target
from mlflow_stack.host_vars import HostVars
from mlflow_stack.layout import ROLES, WORKER_ROLES
from mlflow_stack.targets import DEFAULT_INVENTORY, InventoryError, ResolvedHost, sandbox_target
from mlflow_stack.vars import StackVars

DEFAULT_PATH = DEFAULT_INVENTORY


def _role_name(name: str) -> str:
    if name not in ROLES:
        raise ValueError(f"unknown role {name!r}; roles: {', '.join(ROLES)}")
    return name


def _pins(value: str | list[str]) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not values:
        raise ValueError("give at least one key (a known_hosts line or a SHA256: fingerprint)")
    return tuple(dict.fromkeys(hostkeys.pin_text(v) for v in values))


def _file(value: Path) -> Path:
    inputs.local_path(str(value), None)
    return value


def _sandbox_name(value: str) -> str:
    return inputs.name(value, None)


RoleName = Annotated[str, AfterValidator(_role_name)]
Address = Annotated[str, AfterValidator(lambda v: inputs.host_address(v, None))]
LoginUser = Annotated[str, AfterValidator(lambda v: inputs.login_user(v, None))]
LocalFile = Annotated[Path, AfterValidator(_file)]
HostKeys = Annotated[str | list[str], AfterValidator(_pins)]


def _policy(value: Any) -> Any:
    """YAML reads an unquoted `off` (or `no`) as false: that is the policy `off` too."""
    return "off" if value is False else value


Policy = Annotated[Literal["strict", "accept-new", "off"], BeforeValidator(_policy)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _HostKeyFields(_Strict):
    # Pinned host keys (known_hosts/.pub lines or SHA256: fingerprints): only these accepted.
    host_key: HostKeys | None = None
    known_hosts: LocalFile | None = None  # the known_hosts file to check (and accept-new into)
    host_key_policy: Policy | None = None  # unset: ~/.ssh/config decides, else accept-new

    @model_validator(mode="after")
    def _pins_need_checking(self):
        if self.host_key and self.host_key_policy == "off":
            raise ValueError("host_key pins a key; host_key_policy off would ignore it")
        return self


class HostEntry(_HostKeyFields):
    address: Address | None = None
    # the address the other hosts reach it at, when not `address` (e.g. an EC2 host reached
    # over SSH on its public IP talks to its workers on the VPC's private one)
    private_address: Address | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    user: LoginUser | None = None
    key: LocalFile | None = None
    sandbox: Annotated[str, AfterValidator(_sandbox_name)] | None = None
    roles: list[RoleName] | None = None
    vars: dict[str, Any] = Field(default_factory=dict)


class GroupEntry(_Strict):
    hosts: list[str] = Field(default_factory=list)
    vars: dict[str, Any] = Field(default_factory=dict)


class Defaults(_HostKeyFields):
    user: LoginUser = "ubuntu"
    port: int = Field(default=22, ge=1, le=65535)
    key: LocalFile | None = None
    roles: list[RoleName] | None = None
    vars: dict[str, Any] = Field(default_factory=dict)


class InventoryModel(_Strict):
    defaults: Defaults = Field(default_factory=Defaults)
    groups: dict[str, GroupEntry] = Field(default_factory=dict)
    hosts: dict[str, HostEntry] = Field(default_factory=dict)

    @field_validator("groups", "hosts")
    @classmethod
    def _names(cls, entries: dict) -> dict:
        for key in entries:
            inputs.name(key, None)
        return entries


# --- loading ---------------------------------------------------------------------------


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path → 1-based line, from a composed YAML node tree."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_map(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, (*path, index), out)
    return out


def _where(lines: dict[tuple, int], loc: tuple) -> str:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return f" (line {lines[loc[:cut]]})"
    return ""


def _format_error(path: Path, lines: dict[tuple, int], err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{path.name}: {dotted}: {message}{_where(lines, loc)}"


def validation_message(path: Path, text: str, exc: ValidationError, prefix: tuple = ()) -> str:
    """One line naming the file, key path, line and problem of the first validation error."""
    try:
        lines = _line_map(yaml.compose(text)) if text.strip() else {}
    except yaml.YAMLError:
        lines = {}
    first = exc.errors()[0]
    first = {**first, "loc": (*prefix, *first["loc"])}
    extra = len(exc.errors()) - 1
    more = f" (+{extra} more problem{'s' if extra > 1 else ''})" if extra else ""
    return _format_error(path, lines, first) + more


class Inventory:
    """A loaded, validated inventory."""

    def __init__(self, model: InventoryModel, path: Path, text: str = "") -> None:
        self.model = model
        self.path = path
        self.text = text
        for group, entry in model.groups.items():
            for index, member in enumerate(entry.hosts):
                if member not in model.hosts:
                    lines = _line_map(yaml.compose(text)) if text.strip() else {}
                    where = _where(lines, ("groups", group, "hosts", index))
                    known = ", ".join(model.hosts) or "none"
                    raise InventoryError(
                        f"{path.name}: groups.{group}.hosts: unknown host {member!r}{where}; "
                        f"hosts defined: {known}"
                    )
        for name in (None, *model.hosts):
            self.vars_for(name)  # validate defaults' and every host's merged vars up front
        for group, entry in model.groups.items():
            self._check_layer(("groups", group, "vars"), entry.vars)

    @classmethod
    def load(cls, path: Path | str = DEFAULT_PATH) -> Inventory:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise InventoryError(
                f"{path}: inventory file not found; create it or pass --inventory PATH"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InventoryError(f"{path.name}: YAML syntax error{where}: {problem}") from None
        if not isinstance(data, dict):
            raise InventoryError(
                f"{path.name}: the top level must be a mapping with defaults/groups/hosts"
            )
        try:
            model = InventoryModel.model_validate(data)
        except ValidationError as exc:
            raise InventoryError(validation_message(path, text, exc)) from None
        return cls(model, path, text)

    def groups_of(self, name: str) -> tuple[str, ...]:
        return tuple(g for g, entry in self.model.groups.items() if name in entry.hosts)

    def vars_for(self, name: str | None) -> HostVars:
        """Defaults' vars, then each group's, then the host's own, deep-merged and validated."""
        layers: list[tuple[tuple, dict]] = [(("defaults", "vars"), self.model.defaults.vars)]
        entry = self.model.hosts.get(name) if name else None
        if name:
            for group in self.groups_of(name):
                layers.append((("groups", group, "vars"), self.model.groups[group].vars))
        if entry is not None:
            layers.append((("hosts", name, "vars"), entry.vars))
        merged: dict[str, Any] = {}
        for prefix, layer in layers:
            self._check_layer(prefix, layer)
            merged = deep_merge(merged, layer)
        try:
            return schema.validate(merged)
        except ValidationError as exc:
            where = f"host {name}" if name else "defaults"
            problem = exc.errors()[0]
            dotted = ".".join(str(p) for p in problem["loc"])
            raise InventoryError(
                f"{self.path.name}: vars of {where}: {dotted}: {problem['msg']}"
            ) from None

    def _check_layer(self, prefix: tuple, layer: dict[str, Any]) -> None:
        try:
            StackVars.model_validate(layer, context={"partial": True})
        except ValidationError as exc:
            raise InventoryError(validation_message(self.path, self.text, exc, prefix)) from None

    def workers_of(self, name: str) -> tuple[str, ...]:
        """For a host of the `server` group, the addresses its tuning workers reach it from
        (the `workers` group's hosts, but itself); () for any other host."""
        if "server" not in self.groups_of(name) or "workers" not in self.model.groups:
            return ()
        members = [w for w in self.model.groups["workers"].hosts if w != name]
        return tuple(dict.fromkeys(_peer_address(self, w) for w in members))

    def roles_for(self, name: str, entry: HostEntry | None) -> tuple[str, ...]:
        if entry is not None and entry.roles is not None:
            return tuple(entry.roles)
        if self.model.defaults.roles is not None:
            return tuple(self.model.defaults.roles)
        groups = self.groups_of(name)
        if "workers" in groups and "server" not in groups:
            return WORKER_ROLES
        return ROLES


def _peer_address(inv: Inventory, name: str) -> str:
    """How the other hosts reach inventory host `name` (its private address, else its own)."""
    entry = inv.model.hosts[name]
    if entry.private_address:
        return entry.private_address
    return _entry_target(inv, name, entry).address


def default_host_spec(inv: Inventory) -> str:
    """The `server` group when it has members, else the local sandbox."""
    server = inv.model.groups.get("server")
    return "server" if server and server.hosts else "sandbox"


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --- resolving --host ------------------------------------------------------------------

_ADDRESS = re.compile(
    r"^(?:(?P<user>[^@\s:]+)@)?(?P<address>\[[0-9a-fA-F:]+\]|[^@\s:]+)"
    r"(?::(?P<port>\d+))?$"
)


def parse_address(spec: str) -> tuple[str | None, str, int | None]:
    """`user@address:port` → (user, address, port); user and port optional."""
    match = _ADDRESS.match(spec)
    if not match or inputs.has_control(spec):
        raise InventoryError(
            f"--host {inputs.show(spec)}: not an inventory name, ssh_config alias or "
            "user@address[:port]"
        )
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise InventoryError(f"--host {spec!r}: port {port} is out of range (1-65535)")
    user = inputs.login_user(match["user"], "--host user") if match["user"] else None
    return user, inputs.host_address(match["address"], "--host address"), port


def _looks_like_address(spec: str) -> bool:
    return "@" in spec or ":" in spec or "." in spec or spec == "localhost"


def _ssh_config_alias(name: str, config_path: Path) -> dict | None:
    import paramiko

    if not config_path.exists():
        return None
    config = paramiko.SSHConfig.from_path(str(config_path))
    if name not in config.get_hostnames():
        return None
    return config.lookup(name)


def host_key_settings(entry: HostEntry | None, defaults: Defaults) -> dict[str, Any]:
    """The Target fields about host keys: the host's own, else the defaults'."""

    def pick(field: str):
        value = getattr(entry, field) if entry is not None else None
        return value if value is not None else getattr(defaults, field)

    known = pick("known_hosts")
    return {
        "known_hosts": known.expanduser() if known else None,
        "host_keys": tuple(pick("host_key") or ()),
        "host_key_policy": pick("host_key_policy"),
    }


def _entry_target(inv: Inventory, name: str, entry: HostEntry) -> Target:
    if entry.sandbox:
        return sandbox_target(name, entry.sandbox)
    d = inv.model.defaults
    if not entry.address:
        raise InventoryError(f"{inv.path.name}: hosts.{name}: needs an address (or sandbox: NAME)")
    key = entry.key or d.key
    return Target(
        name,
        entry.address,
        entry.port or d.port,
        entry.user or d.user,
        key.expanduser() if key else None,
        **host_key_settings(entry, d),
    )


def resolve(spec: str, inv: Inventory, *, ssh_config: Path | None = None) -> list[ResolvedHost]:
    """Concrete hosts for a `--host` value (comma-separated values allowed)."""
    ssh_config = ssh_config or Path("~/.ssh/config").expanduser()
    out: list[ResolvedHost] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        out += _resolve_one(part, inv, ssh_config)
    if not out:
        raise InventoryError("--host is empty: name an inventory host or group, or user@address")
    names = [h.name for h in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InventoryError(f"--host names {', '.join(sorted(dupes))} more than once")
    return out


def _resolve_one(part: str, inv: Inventory, ssh_config: Path) -> list[ResolvedHost]:
    m = inv.model
    if part in m.groups:  # its members are inventory hosts (checked on load), even one
        # named like the group itself
        return [_inventory_host(member, inv) for member in m.groups[part].hosts]
    if part in m.hosts:
        return [_inventory_host(part, inv)]
    return _outside_host(part, inv, ssh_config)


def _inventory_host(part: str, inv: Inventory) -> ResolvedHost:
    """Host `part` as the inventory's `hosts` define it."""
    entry = inv.model.hosts[part]
    return ResolvedHost(
        part,
        _entry_target(inv, part, entry),
        inv.roles_for(part, entry),
        inv.vars_for(part),
        inv.groups_of(part),
        entry.private_address or "",
        inv.workers_of(part),
    )


def _outside_host(part: str, inv: Inventory, ssh_config: Path) -> list[ResolvedHost]:
    """`part` not in the inventory: an ~/.ssh/config alias, a sandbox or user@address:port."""
    m = inv.model
    adhoc_roles = inv.roles_for(part, None)
    if not _looks_like_address(part):
        inputs.name(part, "--host")
    alias = _ssh_config_alias(part, ssh_config)
    if alias is not None:
        keys = alias.get("identityfile") or []
        where = f"~/.ssh/config Host {part}"
        target = Target(
            part,
            inputs.host_address(alias.get("hostname", part), f"{where}: HostName"),
            inputs.whole_number(alias.get("port", m.defaults.port), f"{where}: Port", 1, 65535),
            inputs.login_user(alias.get("user", m.defaults.user), f"{where}: User"),
            Path(keys[0]).expanduser() if keys else None,
            ssh_host=part,
            **host_key_settings(None, m.defaults),
        )
        return [ResolvedHost(part, target, adhoc_roles, inv.vars_for(None))]
    if not _looks_like_address(part):
        from mlflow_stack import sandbox

        if sandbox.load(part) is not None:
            return [ResolvedHost(part, sandbox_target(part, part), adhoc_roles, inv.vars_for(None))]
        known = ", ".join([*m.hosts, *m.groups]) or "none"
        raise InventoryError(
            f"unknown host {part!r}: not in {inv.path.name} (hosts and groups: {known}), "
            "not an ~/.ssh/config alias, not a running sandbox; use user@address[:port]"
        )
    user, address, port = parse_address(part)
    d = m.defaults
    target = Target(
        part,
        address,
        port or d.port,
        user or d.user,
        d.key.expanduser() if d.key else None,
        **host_key_settings(None, d),
    )
    return [ResolvedHost(part, target, adhoc_roles, inv.vars_for(None))]
