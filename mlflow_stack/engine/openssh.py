"""SSH through the OpenSSH client, multiplexed over one master connection per target.

`open()` starts a master (`ssh -M -N -f`, `ControlPersist`) unless one already listens on
the target's control socket; every command is then an `ssh` process that opens a session
over that socket: no key exchange, no Paramiko. The master outlives the run by
`CONTROL_PERSIST` seconds, so the next `invoke` finds it warm. Sockets live in a per-user
0700 directory (`control_dir()`); a stale one (its master killed) is replaced.

Host keys are OpenSSH's business (see `engine.hostkeys` for the policy): every `ssh` runs
with `-F` on a generated configuration that includes `~/.ssh/config` *first* (OpenSSH keeps
the first value it obtains, so whatever the user set there wins), then the tool's defaults
(`StrictHostKeyChecking accept-new`, and a `KnownHostsCommand` that notes the key offered
for the one-line refusal), then the system-wide `/etc/ssh/ssh_config`. What the inventory
says about a host (pinned keys, a known_hosts file, a policy) goes on the command line and
wins. A refused key stops the master's start, before any command exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import pwd
import re
import select
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow_stack.engine import hostkeys
from mlflow_stack.engine.link import CONNECT_TIMEOUT, HostError, Output, Target, unreachable

CONTROL_PERSIST = 600  # seconds a master stays after its last command
DIR_ENV = "MLFLOW_STACK_SSH_DIR"
OFFERED_ENV = "MLFLOW_STACK_OFFERED_KEY"  # where the helper notes the key a server offered
PIN_ALIAS = "mlflow-stack-pinned-host"  # the known_hosts name of a pinned host's key
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
# ssh's KnownHostsCommand: notes the offered key (type, fingerprint) in $MLFLOW_STACK_OFFERED_KEY
# and, given pinned fingerprints, vouches for the offered key when its fingerprint is one.
HELPER = """#!/bin/sh
# Written by mlflow-stack (mlflow_stack/engine/openssh.py): ssh's KnownHostsCommand.
# Arguments: %H %t %f %K [PINNED-FINGERPRINT ...]
[ $# -ge 4 ] || exit 0
name=$1 type=$2 fp=$3 key=$4
shift 4
[ -n "$key" ] || exit 0
if [ -n "$MLFLOW_STACK_OFFERED_KEY" ]; then
  printf '%s %s\\n' "$type" "$fp" >"$MLFLOW_STACK_OFFERED_KEY" 2>/dev/null
fi
for pin do
  if [ "$pin" = "$fp" ]; then printf '%s %s %s\\n' "$name" "$type" "$key"; break; fi
done
exit 0
"""


def control_dir() -> Path:
    """This user's directory of control sockets, created 0700; refused if others can use it."""
    if os.environ.get(DIR_ENV):
        path = Path(os.environ[DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "mlflow-stack-ssh"
    else:
        path = Path(f"/tmp/mlflow-stack-ssh-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise HostError(
            f"{path}: SSH control socket directory must be a directory of yours with mode 0700; "
            f"remove it or set {DIR_ENV}"
        )
    return path


# --- the generated configuration ---------------------------------------------------------


def _conf_path(path: Path) -> str:
    """A path in an ssh_config line (double-quoted: it may hold spaces)."""
    text = str(path)
    if '"' in text or "\n" in text:
        raise HostError(f"{text!r}: a path for ssh may not hold quotes or newlines")
    return f'"{text}"'


def same_home() -> bool:
    """True if $HOME is this user's home in the passwd database (what ssh itself reads)."""
    try:
        passwd = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return False
    return os.path.realpath(hostkeys.home()) == os.path.realpath(passwd)


def config_text(helper: Path) -> str:
    """The configuration `ssh -F` reads: the user's first, the tool's defaults, the system's."""
    home = hostkeys.home()
    lines = [
        "# Written by mlflow-stack for its ssh (-F); see mlflow_stack/engine/openssh.py.",
        "# Your own configuration comes first: ssh keeps the first value it obtains.",
        f"Include {_conf_path(home / '.ssh/config')}",
        "# mlflow-stack's defaults, for what you did not set:",
        f"StrictHostKeyChecking {hostkeys.DEFAULT_POLICY}",
    ]
    if not same_home():  # ssh reads the passwd home's files; this tool reads $HOME's
        files = " ".join(_conf_path(p) for p in hostkeys.default_user_files())
        lines.append(f"UserKnownHostsFile {files}")
    lines += [
        "IgnoreUnknown KnownHostsCommand",  # OpenSSH before 8.5: no offered key in messages
        f"KnownHostsCommand {_conf_path(helper)} %H %t %f %K",
        "# then the system-wide configuration, as ssh reads it after yours:",
        f"Include {_conf_path(SYSTEM_CONFIG)}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Files:
    """The generated files every `ssh` of this tool uses (named by their content)."""

    config: Path
    helper: Path
    config_text: str

    @classmethod
    def in_dir(cls, directory: Path) -> Files:
        helper = directory / f"known-hosts-{_digest(HELPER)}.sh"
        text = config_text(helper)
        return cls(directory / f"ssh_config-{_digest(text)}", helper, text)

    def install(self) -> Files:
        """Write the files unless present (atomically; the helper 0700, the config 0600)."""
        for path, text, mode in (
            (self.helper, HELPER, 0o700),
            (self.config, self.config_text, 0o600),
        ):
            if path.exists():
                continue
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(tmp, path)
        return self


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def control_path(target: Target, directory: Path, files: Files | None = None) -> Path:
    """The socket of `target`'s master: one per user, address, port, key, host key settings
    and configuration (a master opened under other host key rules is never reused)."""
    files = files or Files.in_dir(directory)
    paths = [str(p.absolute()) if p else "" for p in (target.key_file, target.known_hosts)]
    ident = "\0".join(
        [
            target.user,
            target.address,
            str(target.port),
            *paths,
            *target.host_keys,
            target.host_key_policy or "",
            target.ssh_host or "",
            files.config.name,
        ]
    )
    return directory / hashlib.sha256(ident.encode()).hexdigest()[:20]


def _quoted(value: object) -> str:
    """An `-o` value, with `%` escaped (OpenSSH expands %-tokens), quoted if it has spaces."""
    text = str(value).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


@functools.cache
def ssh_version() -> tuple[int, int]:
    """The OpenSSH client's version (major, minor); (0, 0) if unknown."""
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def check_pins_supported(name: str, target: Target) -> None:
    """Pins need ssh's KnownHostsCommand (OpenSSH 8.5, 2021); say so plainly otherwise."""
    if target.host_keys and ssh_version() < (8, 5):
        major, minor = ssh_version()
        raise HostError(
            f"{name}: a pinned host_key needs OpenSSH 8.5 or later (this ssh is "
            f"{major}.{minor}); upgrade it, or set MLFLOW_STACK_SSH=paramiko"
        )


def host_key_options(target: Target, helper: Path) -> list[str]:
    """What the inventory says about the host's key, as command-line options (they win over
    any configuration file); nothing when it says nothing."""
    if target.host_keys:
        pins = hostkeys.pins_of(target.host_keys)
        opts = [
            "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/dev/null",
            "GlobalKnownHostsFile=/dev/null",
            f"HostKeyAlias={PIN_ALIAS}",
            "CheckHostIP=no",
            "UpdateHostKeys=no",
            "FingerprintHash=sha256",
            f"KnownHostsCommand={_quoted(helper)} %H %t %f %K "
            + " ".join(p.fingerprint for p in pins),
        ]
        algorithms = hostkeys.pinned_algorithms(pins)
        if algorithms:
            opts.append(f"HostKeyAlgorithms={','.join(algorithms)}")
        return [x for o in opts for x in ("-o", o)]
    policy = target.host_key_policy
    opts = []
    if policy == "off":
        opts = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                "GlobalKnownHostsFile=/dev/null"]  # fmt: skip
    else:
        if target.known_hosts is not None:
            opts += [
                f"UserKnownHostsFile={_quoted(target.known_hosts.absolute())}",
                "GlobalKnownHostsFile=/dev/null",
            ]
            policy = policy or hostkeys.DEFAULT_POLICY
        if policy:
            opts.append(f"StrictHostKeyChecking={'yes' if policy == 'strict' else policy}")
    return [x for o in opts for x in ("-o", o)]


def base_options(target: Target, files: Files) -> list[str]:
    """Options of every `ssh` to `target`: configuration, login, timeouts, host keys."""
    opts = [
        "-F", str(files.config),
        "-T", "-x", "-a",
        "-p", str(target.port),
        "-l", target.user,
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", "LogLevel=ERROR",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
    ]  # fmt: skip
    if target.key_file is not None:  # absolute: the master runs in /
        opts += ["-i", str(target.key_file.absolute()).replace("%", "%%")]
        opts += ["-o", "IdentitiesOnly=yes"]
    return opts + host_key_options(target, files.helper)


def options(target: Target, control: Path, files: Files | None = None) -> list[str]:
    """Client options shared by the master and every command."""
    files = files or Files.in_dir(control.parent)
    return [
        *base_options(target, files),
        "-o", "ClearAllForwardings=yes",
        "-o", "RemoteCommand=none",
        "-o", f"ControlPath={_quoted(control)}",
    ]  # fmt: skip


def destination(target: Target) -> str:
    """What ssh is asked to connect to: the ~/.ssh/config alias, else the address."""
    return target.ssh_host or target.address


def master_argv(target: Target, control: Path, files: Files | None = None) -> list[str]:
    """`ssh` starting the master: it backgrounds itself once authenticated."""
    return [
        "ssh", *options(target, control, files),
        "-M", "-N", "-f", "-o", f"ControlPersist={CONTROL_PERSIST}",
        "--", destination(target),
    ]  # fmt: skip


def command_argv(target: Target, control: Path, command: str, files: Files | None = None):
    """`ssh` running `command` over the master (a direct connection if it is gone)."""
    return [
        "ssh",
        *options(target, control, files),
        "-o",
        "ControlMaster=no",
        "--",
        destination(target),
        command,
    ]


def forward_argv(target: Target, files: Files, specs: list[str]) -> list[str]:
    """`ssh -N` holding local forwards (`-L` specs) on a connection of its own, checked like
    every other (it dies with the process that started it)."""
    argv = ["ssh", *base_options(target, files), "-N", "-o", "ExitOnForwardFailure=yes"]
    argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    for spec in specs:
        argv += ["-L", spec]
    return [*argv, "--", destination(target)]


def ssh_env(offered: Path | None = None) -> dict[str, str]:
    """The client's environment without LANG/LC_*: like Paramiko, send no locale to the host;
    `offered`: where the KnownHostsCommand notes the key the server offers."""
    env = {k: v for k, v in os.environ.items() if k != "LANG" and not k.startswith("LC_")}
    env.pop(OFFERED_ENV, None)
    if offered is not None:
        env[OFFERED_ENV] = str(offered)
    return env


def offered_path(control: Path) -> Path:
    return control.with_name(control.name + ".offered")


def listening(path: Path) -> bool:
    """True if a master answers on `path`; a stale socket (nobody listening) is removed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False
    except OSError:
        return False
    finally:
        sock.close()


# --- one-line errors ---------------------------------------------------------------------

_PERMISSION = re.compile(r"^.*Permission denied.*$", re.M)
_CONNECT = re.compile(r"ssh: connect to host \S+ port \d+: (.+)")
_RESOLVE = re.compile(r"ssh: Could not resolve hostname [^:]+: (.+)")
_SENT = re.compile(r"key sent by the remote host is\s+(\S+?)\.?\s*$", re.M)
_SENT_TYPE = re.compile(r"The fingerprint for the (\S+) key sent by the remote host")
_OFFENDING = re.compile(r"Offending (\S+) key in (.+):(\d+)\s*$", re.M)
_UNKNOWN = re.compile(r"No (\S+) host key is known for (\S+) and you have requested strict")
_CHANGED_FOR = re.compile(r"Host key for (\S+) has changed")


@dataclass(frozen=True)
class Offered:
    """The key a server offered, as the KnownHostsCommand noted it."""

    key_type: str
    fingerprint: str

    @classmethod
    def read(cls, path: Path | None) -> Offered | None:
        try:
            key_type, fp = path.read_text().split()[:2] if path else ("", "")
        except (OSError, ValueError):
            return None
        return cls(key_type, fp) if fp else None

    def __str__(self) -> str:
        return hostkeys.describe(self.fingerprint, self.key_type)


def _known_line(path: str, number: int) -> str:
    """`fingerprint (type, path:line)` of a known_hosts line, for the message."""
    try:
        line = Path(path).read_text(errors="replace").splitlines()[number - 1]
    except (OSError, IndexError):
        return f"the key at {path}:{number}"
    keys = hostkeys.parse_known_hosts(line, path)
    if not keys:
        return f"the key at {path}:{number}"
    return hostkeys.describe(keys[0].fingerprint, keys[0].key_type, f"{path}:{number}")


def host_key_message(
    name: str,
    target: Target,
    stderr: str,
    offered: Offered | None,
    known_files: list[str] | None = None,
) -> str | None:
    """The refusal for a host key ssh did not accept, or None if that is not what failed."""
    label = target.label
    changed = "IDENTIFICATION HAS CHANGED" in stderr or _CHANGED_FOR.search(stderr)
    unknown = _UNKNOWN.search(stderr)
    if not (changed or unknown or "Host key verification failed" in stderr):
        return None
    sent = _SENT.search(stderr)
    if sent:
        kind = _SENT_TYPE.search(stderr)
        shown = hostkeys.describe(
            sent[1], offered.key_type if offered else (kind[1] if kind else "")
        )
    else:
        shown = str(offered) if offered else "a key ssh did not show"
    if target.host_keys:
        pins = hostkeys.pins_of(target.host_keys)
        expected = " or ".join(hostkeys.describe(p.fingerprint, p.key_type) for p in pins)
        return hostkeys.refusal(
            name,
            label,
            "does not match the inventory's pin",
            shown,
            f"{expected} (inventory host_key)",
            hostkeys.PIN_FIX,
        )
    lookup = hostkeys.lookup_name(target.address, target.port)
    if changed:
        offending = _OFFENDING.search(stderr)
        if offending:
            path, number = offending[2].strip(), int(offending[3])
            expected, fix_file = _known_line(path, number), path
        else:
            expected = "the key known for it"
            fix_file = str(target.known_hosts or hostkeys.default_user_files()[0])
        if _CHANGED_FOR.search(stderr):
            lookup = _CHANGED_FOR.search(stderr)[1]
        return hostkeys.refusal(
            name, label, "has changed", shown, expected, hostkeys.changed_fix(lookup, fix_file)
        )
    where = ", ".join(known_files or []) or str(target.known_hosts or "known_hosts")
    looked_up = unknown[2] if unknown else lookup
    return hostkeys.refusal(
        name,
        label,
        "is unknown and host keys are checked strictly",
        shown,
        f"a key listed in {where} (none for {looked_up})",
        hostkeys.unknown_fix(name, shown),
    )


def classify(
    name: str,
    target: Target,
    stderr: str,
    offered: Offered | None = None,
    known_files: list[str] | None = None,
) -> str:
    """The one-line `HostError` message for a failed master start, from ssh's stderr."""
    t = target
    refused = host_key_message(name, target, stderr, offered, known_files)
    if refused:
        return refused
    if m := _PERMISSION.search(stderr):
        key = f" with key {t.key_file}" if t.key_file else ""
        return (
            f"{name}: SSH authentication failed for {t.label}{key} ({m[0].strip()}); "
            "check the user and the key in the inventory"
        )
    if m := _CONNECT.search(stderr) or _RESOLVE.search(stderr):
        reason = m[1].strip()
        return unreachable(name, t, None if "timed out" in reason else reason)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"{name}: SSH to {t.label} failed: {lines[-1] if lines else 'ssh exited with 255'}"


def effective_known_hosts(target: Target, files: Files) -> list[str]:
    """The known_hosts files ssh reads for `target` (`ssh -G`), for a message."""
    argv = ["ssh", "-G", *base_options(target, files), "--", destination(target)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=ssh_env())
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("userknownhostsfile", "globalknownhostsfile"):
            found += [v for v in value.split() if v != "/dev/null"]
    return found


class OpenSshLink:
    """Commands as `ssh` processes sharing one master connection to `target`."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self._control: Path | None = None
        self._files: Files | None = None

    @property
    def is_open(self) -> bool:
        return self._control is not None

    def open(self) -> None:
        """Find this target's master, or start one (one starter at a time, across processes)."""
        hostkeys.warn_if_off(self.name, self.target)
        check_pins_supported(self.name, self.target)
        directory = control_dir()
        files = Files.in_dir(directory).install()
        control = control_path(self.target, directory, files)
        with open(f"{control}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not listening(control):
                self._start_master(control, files)
        self._control = control
        self._files = files

    def _start_master(self, control: Path, files: Files) -> None:
        argv = master_argv(self.target, control, files)
        spy = offered_path(control)
        with contextlib.suppress(FileNotFoundError):
            spy.unlink()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=ssh_env(spy),
                cwd="/",  # it outlives this run: hold no directory of the controller's
                timeout=3 * CONNECT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise HostError(unreachable(self.name, self.target, None)) from None
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            known = None
            if _UNKNOWN.search(stderr) and not self.target.host_keys:
                known = effective_known_hosts(self.target, files)
            offered = Offered.read(spy)
            refused = host_key_message(self.name, self.target, stderr, offered, known)
            if refused:
                raise hostkeys.HostKeyError(refused)
            raise HostError(classify(self.name, self.target, stderr, offered))

    def run(self, command: str, stdin: bytes | None, timeout: float | None, on_output) -> Output:
        """Run `command` in an `ssh` process; `timeout`: at most that long without output."""
        assert self._control is not None, "open() first"
        proc = subprocess.Popen(
            command_argv(self.target, self._control, command, self._files),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ssh_env(offered_path(self._control)),
        )
        return _collect(proc, stdin, timeout, on_output)

    def stream(self, command: str, source, sink, timeout: float | None) -> Output:
        """Run `command`, stdin from `source`, stdout to `sink` (`engine.streams`)."""
        from mlflow_stack.engine import streams

        assert self._control is not None, "open() first"
        proc = subprocess.Popen(
            command_argv(self.target, self._control, command),
            stdin=subprocess.PIPE if source is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ssh_env(),
        )
        return streams.pump_process(proc, source, sink, timeout)

    def close(self) -> None:
        """Nothing to close: the master stays for the next commands and runs."""
        self._control = None


def _collect(proc: subprocess.Popen, stdin: bytes | None, timeout: float | None, on_output):
    """Feed stdin, stream stdout (line by line to `on_output`), gather stderr, wait."""
    last = [time.monotonic()]
    errors: list[bytes] = []

    def drain_errors() -> None:
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
            errors.append(chunk)
            last[0] = time.monotonic()

    def feed() -> None:
        with contextlib.suppress(OSError):
            proc.stdin.write(stdin)
        with contextlib.suppress(OSError):
            proc.stdin.close()

    threads = [threading.Thread(target=drain_errors, daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for thread in threads:
        thread.start()
    out, pending, fd = [], b"", proc.stdout.fileno()
    silent = False
    while True:
        wait = None if not timeout else max(0.0, last[0] + timeout - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            if timeout and time.monotonic() - last[0] >= timeout:
                silent = True
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        last[0] = time.monotonic()
        out.append(chunk)
        if on_output is not None:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_output(line.decode(errors="replace"))
    if silent:
        proc.kill()
    if on_output is not None and pending:
        on_output(pending.decode(errors="replace"))
    rc = proc.wait()
    for thread in threads:
        thread.join(timeout=5)
    proc.stdout.close()
    proc.stderr.close()
    stderr = b"".join(errors).decode(errors="replace")
    return Output(None if silent else rc, b"".join(out).decode(errors="replace"), stderr)
