"""Host keys: pins, fingerprints, known_hosts files, the policy and the one-line refusal.

A target's host key is checked before anything is sent to it, on every transport:

- **pinned** (`host_key:` in the inventory: a known_hosts/`.pub` line, or a `SHA256:`
  fingerprint such as the EC2 console output prints): only a key with one of the pinned
  fingerprints is accepted, whatever known_hosts files say;
- otherwise the **policy**: `strict` (only keys already in known_hosts), `accept-new` (the
  default: an unknown host's key is added to known_hosts, a changed one refused) or `off`
  (no checking; only when written in the inventory, and warned about on every run). Unset in
  the inventory, `~/.ssh/config` decides (StrictHostKeyChecking, UserKnownHostsFile,
  HostKeyAlias), as for `ssh`; `accept-new` is the default beneath it.

The OpenSSH link enforces this through ssh's own options (`engine.openssh`); the Paramiko
link and its port forwards through `check_paramiko_key` here. Both refuse with
`refusal()`: the host, the fingerprint offered, the fingerprint expected and the fix.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import os
import re
import shlex
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_stack.engine.link import HostError

if TYPE_CHECKING:
    from mlflow_stack.engine.link import Target

POLICIES = ("strict", "accept-new", "off")
DEFAULT_POLICY = "accept-new"
PINNED = "pinned"
# ssh's key type names (the first field of a key blob) → the host key algorithms using them
ALGORITHMS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ssh-dss": ("ssh-dss",),
    "sk-ssh-ed25519@openssh.com": ("sk-ssh-ed25519@openssh.com",),
    "sk-ecdsa-sha2-nistp256@openssh.com": ("sk-ecdsa-sha2-nistp256@openssh.com",),
}
# the key type the EC2 console output (ssh-keygen -l) names in parentheses, by bits for ECDSA
_CONSOLE_TYPES = {"ED25519": "ssh-ed25519", "RSA": "ssh-rsa", "DSA": "ssh-dss"}
_ECDSA_BITS = {"256": "ecdsa-sha2-nistp256", "384": "ecdsa-sha2-nistp384",
               "521": "ecdsa-sha2-nistp521"}  # fmt: skip
_FINGERPRINT = re.compile(r"SHA256:([A-Za-z0-9+/]{43})=?(?![A-Za-z0-9+/])")
FIX_PIN = "check the key out of band (EC2: the instance's console output, Get system log)"


class HostKeyError(HostError):
    """The host's key is refused (changed, unknown under strict, not the pinned one)."""


# --- keys and fingerprints ---------------------------------------------------------------


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a key blob: `SHA256:` + unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def blob_type(blob: bytes) -> str | None:
    """The key type named inside a key blob (its first string), or None if malformed."""
    if len(blob) < 4:
        return None
    size = int.from_bytes(blob[:4], "big")
    if size > 64 or len(blob) < 4 + size:
        return None
    try:
        return blob[4 : 4 + size].decode("ascii")
    except UnicodeDecodeError:
        return None


def decode_key(key_type: str, data: str) -> bytes | None:
    """The blob of a base64 public key whose embedded type is `key_type`, else None."""
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return blob if blob_type(blob) == key_type else None


@dataclass(frozen=True)
class Pin:
    """An accepted host key: its fingerprint and, when known, its type."""

    fingerprint: str
    key_type: str = ""

    def __str__(self) -> str:
        return f"{self.key_type} {self.fingerprint}" if self.key_type else self.fingerprint


def parse_pin(text: str) -> Pin:
    """A pin from what users copy: a known_hosts line (`host type key`), a `.pub` line
    (`type key comment`), a fingerprint (`SHA256:…`, optionally after the key type), or a
    line of the EC2 console's fingerprint block (`256 SHA256:… root@ip (ED25519)`).
    ValueError (with a one-line reason) for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a host key pin must be a known_hosts line or a SHA256: fingerprint")
    if re.search("[\x00-\x1f\x7f]", text.strip()):
        raise ValueError("a host key pin is one line (no control characters)")
    fields = text.split()
    if fields[0].startswith("@"):
        raise ValueError(f"{fields[0]} lines cannot pin a host key; give the key itself")
    for index, field in enumerate(fields[:-1]):
        if field in ALGORITHMS:
            blob = decode_key(field, fields[index + 1])
            if blob is not None:
                return Pin(fingerprint(blob), field)
            if not _FINGERPRINT.fullmatch(fields[index + 1]):
                raise ValueError(f"the {field} key is not valid base64 of a {field} key")
    found = _FINGERPRINT.search(text)
    if not found:
        raise ValueError(
            "not a host key: give a known_hosts line (type and base64 key) or a SHA256: "
            "fingerprint (ssh-keygen -lf, or the EC2 console output)"
        )
    value = f"SHA256:{found[1]}"
    key_type = next((f for f in fields if f in ALGORITHMS), "")
    console = re.search(r"\((ED25519|ECDSA|RSA|DSA)\)", text)
    if not key_type and console:
        if console[1] == "ECDSA":
            key_type = _ECDSA_BITS.get(fields[0], "")
        else:
            key_type = _CONSOLE_TYPES[console[1]]
    return Pin(value, key_type)


def pin_text(value: str) -> str:
    """A pin as the inventory keeps it once validated: `[type ]SHA256:…`."""
    return str(parse_pin(value))


def pins_of(values: tuple[str, ...]) -> tuple[Pin, ...]:
    return tuple(parse_pin(v) for v in values)


def pinned_algorithms(pins: tuple[Pin, ...]) -> list[str] | None:
    """Host key algorithms to offer so that the server answers with a pinned key type, in
    OpenSSH's order of preference (None: some pin has no type, so any)."""
    if not pins or any(not p.key_type for p in pins):
        return None
    wanted = {a for p in pins for a in ALGORITHMS[p.key_type]}
    return [a for algorithms in ALGORITHMS.values() for a in algorithms if a in wanted]


# --- known_hosts files -------------------------------------------------------------------


@dataclass(frozen=True)
class KnownKey:
    """One key line of a known_hosts file."""

    marker: str  # "", "@revoked" or "@cert-authority"
    hosts: str
    key_type: str
    data: str  # base64
    source: str  # "path:line"

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.data)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


def parse_known_hosts(text: str, path: str = "") -> list[KnownKey]:
    """The key lines of a known_hosts file (comments, blanks and malformed lines skipped)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        if len(fields) < 3 or decode_key(fields[1], fields[2]) is None:
            continue
        out.append(KnownKey(marker, fields[0], fields[1], fields[2], f"{path}:{number}"))
    return out


def read_known_hosts(path: Path) -> list[KnownKey]:
    try:
        return parse_known_hosts(path.read_text(errors="replace"), str(path))
    except OSError:
        return []


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            salt, digest = (base64.b64decode(p) for p in pattern[3:].split("|", 1))
        except (binascii.Error, ValueError):
            return False
        mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, digest)
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


def host_matches(hosts: str, name: str) -> bool:
    """Whether a known_hosts host field (patterns, negations, hashed names) names `name`."""
    matched = False
    for pattern in hosts.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


def lookup_name(address: str, port: int, alias: str | None = None) -> str:
    """The name ssh looks a host up by: the alias, `address`, or `[address]:port`."""
    if alias:
        return alias
    return address if port == 22 else f"[{address}]:{port}"


def append_known_host(path: Path, name: str, key_type: str, data: str) -> None:
    """Add `name type key` to a known_hosts file (created 0600 in a 0700 dir if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as out:
        if out.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.write(f"{name} {key_type} {data}\n")


# --- the refusal -------------------------------------------------------------------------


def refusal(name: str, label: str, problem: str, offered: str, expected: str, fix: str) -> str:
    """The one line for a refused host key."""
    return (
        f"{name}: host key of {label} {problem}: offered {offered}, expected {expected}; "
        f"nothing was sent to it; {fix}"
    )


def changed_fix(lookup: str, path: str) -> str:
    return (
        f"if the host was really replaced, {FIX_PIN}, then remove the old key: "
        f"ssh-keygen -R {shlex.quote(lookup)} -f {shlex.quote(path)}"
    )


def unknown_fix(name: str, offered: str) -> str:
    pin = offered.split(" ")[0] if offered.startswith("SHA256:") else "SHA256:…"
    return f"{FIX_PIN} and pin it in the inventory (hosts.{name}.host_key: {pin})"


PIN_FIX = (
    f"if the host was really replaced, {FIX_PIN} and pin its new key (host_key in the inventory)"
)


def describe(fp: str, key_type: str = "", where: str = "") -> str:
    extra = ", ".join(x for x in (key_type, where) if x)
    return f"{fp} ({extra})" if extra else fp


# --- policy for Paramiko (OpenSSH applies it through its options) -------------------------


@dataclass(frozen=True)
class Settings:
    """The effective host key checking for one target."""

    policy: str  # strict | accept-new | off | pinned
    user_files: tuple[Path, ...] = ()  # read; the first is where accept-new writes
    global_files: tuple[Path, ...] = ()  # read only
    alias: str | None = None
    pins: tuple[Pin, ...] = ()

    def lookup(self, target: Target) -> str:
        return lookup_name(target.address, target.port, self.alias)


def home() -> Path:
    """The home directory whose ~/.ssh this tool reads: $HOME, as Python and Paramiko do."""
    return Path(os.path.expanduser("~"))


def default_user_files() -> tuple[Path, ...]:
    return (home() / ".ssh/known_hosts", home() / ".ssh/known_hosts2")


GLOBAL_FILES = (Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))


def _config_policy(value: str | None) -> str | None:
    mapping = {"yes": "strict", "ask": "strict", "accept-new": "accept-new", "no": "off",
               "off": "off"}  # fmt: skip
    return mapping.get((value or "").strip().lower())


def settings(target: Target, ssh_config: dict | None = None) -> Settings:
    """What applies to `target`: its pins; else its inventory settings over `ssh_config`
    (the `~/.ssh/config` entry of the host, keys lower-cased, as Paramiko reads it)."""
    if target.host_keys:
        return Settings(PINNED, pins=pins_of(target.host_keys))
    config = ssh_config or {}
    if target.known_hosts is not None:
        files: tuple[Path, ...] = (target.known_hosts,)
        global_files: tuple[Path, ...] = ()
        alias = None
    else:
        named = config.get("userknownhostsfile")
        words = named.split() if isinstance(named, str) else list(named or [])
        files = tuple(Path(os.path.expanduser(w)) for w in words) or default_user_files()
        named_global = config.get("globalknownhostsfile")
        global_words = (
            named_global.split() if isinstance(named_global, str) else list(named_global or [])
        )
        global_files = tuple(Path(os.path.expanduser(w)) for w in global_words) or GLOBAL_FILES
        alias = config.get("hostkeyalias")
    policy = (
        target.host_key_policy
        or _config_policy(config.get("stricthostkeychecking"))
        or DEFAULT_POLICY
    )
    if policy == "off":
        return Settings("off")
    files = tuple(f for f in files if str(f) != "/dev/null")
    global_files = tuple(f for f in global_files if str(f) != "/dev/null")
    return Settings(policy, files, global_files, alias)


def known_keys(s: Settings, lookup: str) -> list[KnownKey]:
    """The known_hosts lines naming `lookup`, in the settings' files."""
    keys = []
    for path in (*s.user_files, *s.global_files):
        keys += [k for k in read_known_hosts(path) if host_matches(k.hosts, lookup)]
    return keys


def check_offered(
    name: str, target: Target, s: Settings, key_type: str, data: str
) -> tuple[list[KnownKey], bool]:
    """Check the key a host offered (type, base64) against `s`: raises `HostKeyError`, or
    returns (the known keys for it, whether to add it to the first user file)."""
    blob = base64.b64decode(data)
    offered = describe(fingerprint(blob), key_type)
    label = target.label
    if s.policy == "off":
        return [], False
    if s.policy == PINNED:
        if any(p.fingerprint == fingerprint(blob) for p in s.pins):
            return [], False
        expected = " or ".join(describe(p.fingerprint, p.key_type) for p in s.pins)
        raise HostKeyError(
            refusal(
                name,
                label,
                "does not match the inventory's pin",
                offered,
                f"{expected} (inventory host_key)",
                PIN_FIX,
            )
        )
    lookup = s.lookup(target)
    keys = known_keys(s, lookup)
    for k in keys:
        if k.marker == "@revoked" and k.data == data:
            raise HostKeyError(
                refusal(
                    name,
                    label,
                    f"is revoked ({k.source})",
                    offered,
                    "any other key",
                    f"{FIX_PIN}; the host may be compromised",
                )
            )
    plain = [k for k in keys if not k.marker]
    if any(k.key_type == key_type and k.data == data for k in plain):
        return plain, False
    if plain:  # known under another key (of any type: stricter than ssh's accept-new)
        old = plain[0]
        raise HostKeyError(
            refusal(
                name,
                label,
                "has changed",
                offered,
                describe(old.fingerprint, old.key_type, old.source),
                changed_fix(lookup, old.source.rsplit(":", 1)[0]),
            )
        )
    if s.policy == "strict":
        where = ", ".join(str(f) for f in s.user_files + s.global_files) or "no file"
        raise HostKeyError(
            refusal(
                name,
                label,
                "is unknown and host keys are checked strictly",
                offered,
                f"a key listed in {where} (none for {lookup})",
                unknown_fix(name, offered),
            )
        )
    return [], bool(s.user_files)


# --- the warning for `off` -----------------------------------------------------------------

_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def warn_if_off(name: str, target: Target) -> None:
    """Say on stderr (once per target and process) that nothing checks this host's key."""
    if target.host_key_policy != "off" or target.host_keys:
        return
    with _warn_lock:
        if (name, target.label) in _warned:
            return
        _warned.add((name, target.label))
    print(
        f"warning: {name}: host key checking is off (host_key_policy: off): whoever answers "
        f"at {target.address}:{target.port} receives the commands and secrets sent",
        file=sys.stderr,
        flush=True,
    )
