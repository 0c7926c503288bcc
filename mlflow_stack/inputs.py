"""The one validation layer: operator inputs (flags) and inventory strings checked at the
boundary, before anything connects or renders.

Each check returns the value (normalised where said) or raises `InputError`, whose one line
names the flag or key (`what`), the value (shortened, escaped) and what is allowed. Where a
strict pattern exists (names, hosts, ports, users, checksums, run ids) it is enforced; other
text (an MLflow experiment, a registered model's name, a local path) is accepted as long as it
holds no control character (newline, NUL, …) and is not too long, and every sink quotes it for
itself (shell: `shlex.quote`; systemd files and env files: `engine.templating`; SQL: literals;
URLs: `urllib.parse`). `InputError` is also a `ValueError`, so the inventory's pydantic
models use the same checks (`what` None: the inventory names the key itself).
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse

from mlflow_stack.errors import UserError


class InputError(UserError, ValueError):
    """A flag's value (or an inventory string) is refused; the message says what is allowed."""


# C0 controls (newline, carriage return, tab, NUL, escape …), DEL, C1 controls and the
# Unicode line and paragraph separators: refused in every string, everywhere.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # inventory hosts and groups
INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")  # a served model's unit instance
STUDY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOGIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")  # POSIX portable user names
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids (uuid4 hex)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
SAFE_PATH = re.compile(r"^/(?:[A-Za-z0-9._+@-]+/?)*$")  # absolute, shell- and unit-inert
MAX_TEXT = 256


def show(value: object, limit: int = 60) -> str:
    """`value` for a one-line message: repr (escapes newlines, NULs), cut after `limit`."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def one_line(text: str, limit: int = 300) -> str:
    """Text from elsewhere (a host, a server) made safe for a one-line message: control
    characters escaped, cut after `limit` characters."""
    flat = _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _refuse(what: str | None, value: object, reason: str) -> InputError:
    return InputError(f"{what} {show(value)}: {reason}" if what else f"{show(value)}: {reason}")


def has_control(text: str) -> bool:
    return bool(_CONTROL.search(text))


def text(value: object, what: str | None, *, max_len: int = MAX_TEXT, empty: bool = False) -> str:
    """Free text: a string without control characters (newline, NUL, …), at most `max_len`."""
    if not isinstance(value, str):
        raise _refuse(what, value, "must be text")
    if has_control(value):
        raise _refuse(what, value, "control characters (newline, NUL, tab, …) are not allowed")
    if not value and not empty:
        raise _refuse(what, value, "must not be empty")
    if len(value) > max_len:
        raise _refuse(what, value, f"longer than {max_len} characters")
    return value


def _pattern(value: object, what: str | None, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or value.endswith("\n"):
        raise _refuse(what, value, f"use {allowed}")
    return value


def name(value: object, what: str | None) -> str:
    """An inventory host or group name."""
    return _pattern(value, what, NAME, "letters, digits, '.', '_' and '-' (at most 63)")


def instance_name(value: object, what: str | None = "--name") -> str:
    """The instance of a served model (`mlflow-model@NAME`, `/etc/mlflow-models/NAME.env`)."""
    return _pattern(value, what, INSTANCE, "lower-case letters, digits, - and _")


def study(value: object, what: str | None = "--study") -> str:
    return _pattern(value, what, STUDY, "letters, digits, '.', '_' and '-' (at most 128)")


def login_user(value: object, what: str | None) -> str:
    return _pattern(value, what, LOGIN, "a user name: letters, digits, '_', '.', '-'")


def sha256(value: object, what: str | None) -> str:
    return _pattern(value, what, SHA256, "64 lower-case hex digits (a sha256)")


def run_id(value: object, what: str | None = "--run") -> str:
    return _pattern(value, what, RUN_ID, "an MLflow run id: 32 lower-case hex digits")


def host_address(value: object, what: str | None) -> str:
    """A DNS name (RFC 1123) or an IPv4/IPv6 address; `[v6]` brackets are removed."""
    if not isinstance(value, str):
        raise _refuse(what, value, "must be text")
    candidate = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    labels = candidate.removesuffix(".").split(".")
    if 0 < len(candidate) <= 253 and all(_LABEL.match(label) for label in labels):
        return candidate
    raise _refuse(what, value, "not a host name or IP address")


def host_pattern(value: object, what: str | None) -> str:
    """A host as MLflow's `--allowed-hosts` takes it: a name or address, `*` wildcards, an
    optional `:port`."""
    allowed = re.compile(r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9*.-]{1,253})(?::(?:\d{1,5}|\*))?$")
    return _pattern(value, what, allowed, "a host name or address (* wildcards, :port)")


def mysql_host(value: object, what: str | None) -> str:
    """A MySQL account host: a name or address with % and _ wildcards, or address/netmask."""
    allowed = re.compile(r"^[A-Za-z0-9.%_:-]{1,255}(?:/[0-9.]{1,15})?$")
    return _pattern(value, what, allowed, "a host, address or pattern (%, _ wildcards)")


def bind_address(value: object, what: str | None) -> str:
    """Where a server listens: an IP address, `*`, or a host name."""
    if value == "*":
        return value
    return host_address(value, what)


def port(value: object, flag: str = "--port") -> int:
    """A TCP port a service of ours may listen on (not a privileged one)."""
    return whole_number(value, flag, 1024, 65535)


def safe_path(value: object, what: str | None) -> str:
    """An absolute path on the host of letters, digits and `._+@-` (no `..` component)."""
    if not isinstance(value, str) or not SAFE_PATH.match(value) or value.endswith("\n"):
        raise _refuse(what, value, "use an absolute path of letters, digits and ._+@-")
    if any(part in (".", "..") for part in value.split("/")) or "//" in value:
        raise _refuse(what, value, "no '.', '..' or empty path components")
    return value.rstrip("/") or "/"


def url(value: object, what: str | None, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """An absolute URL of `schemes` with a host, printable ASCII only; quotes, backslashes,
    backticks, `$` and spaces must be percent-encoded."""
    checked = text(value, what, max_len=2048)
    if re.search(r"[^\x21-\x7e]|[\"'`$\\<>{}|^]", checked):
        raise _refuse(what, value, "percent-encode spaces, quotes, $, \\ and non-ASCII in URLs")
    parts = urllib.parse.urlsplit(checked)
    if parts.scheme not in schemes or not parts.hostname:
        raise _refuse(what, value, f"use a {' or '.join(schemes)} URL with a host")
    return checked


def model_uri(value: object, what: str | None = "--model") -> str:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/m-ID`. A registered model's
    name may hold quotes, `$`, `;` (MLflow allows them): it is quoted wherever it goes."""
    checked = text(value, what, max_len=512)
    body = checked.removeprefix("models:/")
    if body == checked or not body or body.startswith("/"):
        raise _refuse(what, value, "use models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-ID")
    return checked


def experiment(value: object, what: str | None = "--experiment") -> str:
    """An MLflow experiment name: free text (quoted on the way), no control characters."""
    return text(value, what)


def local_path(value: object, what: str | None) -> str:
    """A path on the controller (read here): no control characters."""
    return text(value, what, max_len=4096)


def whole_number(value: object, flag: str, low: int = 1, high: int | None = None) -> int:
    """An integer flag within bounds."""
    try:
        number = int(str(value))
    except ValueError:
        raise InputError(f"{flag} {show(value)}: not a whole number") from None
    if number < low or (high is not None and number > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise InputError(f"{flag} {number}: must be {bounds}")
    return number


def number(value: object, flag: str, low: float, high: float | None = None) -> float:
    """A finite float flag within bounds."""
    try:
        result = float(str(value))
    except ValueError:
        raise InputError(f"{flag} {show(value)}: not a number") from None
    if not math.isfinite(result) or result < low or (high is not None and result > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise InputError(f"{flag} {value}: must be {bounds}")
    return result


def no_control(data: object, where: str = "") -> None:
    """Refuse a control character in any string (key or value) of nested dicts and lists."""
    if isinstance(data, str):
        if has_control(data):
            raise InputError(
                f"{where + ': ' if where else ''}{show(data)}: control characters "
                "(newline, NUL, tab, …) are not allowed"
            )
    elif isinstance(data, dict):
        for key, item in data.items():
            no_control(key, where)
            no_control(item, f"{where}.{key}" if where else str(key))
    elif isinstance(data, (list, tuple)):
        for index, item in enumerate(data):
            no_control(item, f"{where}.{index}" if where else str(index))
