"""Shared helpers for end-to-end tests: inventories for a sandbox, CLI runs, host commands,
and the tunnel through which the controller reaches a host's loopback services."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow_stack.engine.host import Host, Target

ROOT = Path(__file__).resolve().parents[2]


def target(info, name: str = "e2e") -> Target:
    """How the tool reaches sandbox `info`: its own pinned key, checked strictly."""
    return Target(
        name, info.address, info.port, info.user, info.key_file, info.known_hosts,
        host_key_policy="strict",
    )  # fmt: skip


def host(info, name: str = "e2e") -> Host:
    return Host(target(info, name))


def inventory(tmp_path: Path, info, name: str = "e2e", vars_yaml: str = "") -> Path:
    """An inventory naming the running sandbox `info` as host `name` (in the server group)."""
    path = tmp_path / "inventory.yaml"
    text = f"groups:\n  server:\n    hosts: [{name}]\nhosts:\n  {name}:\n    sandbox: {info.name}\n"
    if vars_yaml:
        text += "    vars:\n" + "".join(f"      {line}\n" for line in vars_yaml.splitlines())
    path.write_text(text)
    return path


def invoke(*args: str, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `invoke ARGS…` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def provision_json(inv: Path, *extra: str, host_name: str = "e2e", env: dict | None = None):
    """`invoke provision --json`: (exit code, parsed JSON or None, completed process)."""
    proc = invoke(
        "provision", "--host", host_name, "--inventory", str(inv), "--json", *extra, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc


def changed_steps(report: dict, host_name: str = "e2e") -> list[str]:
    return [
        f"{s['role']}: {s['step']}" for s in report["hosts"][host_name] if s["status"] == "changed"
    ]


def secret_forms(value: str) -> set[str]:
    """A secret as it may appear in output: plain, URL-encoded, JSON-escaped."""
    from urllib.parse import quote, quote_plus

    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}


def sh(h: Host, script: str, **kwargs) -> str:
    """Run `script` as root on the host; fail the test with its stderr on a non-zero exit."""
    result = h.run(script, **kwargs)
    assert result.ok, f"{script!r} failed ({result.rc}): {result.stderr.strip()}"
    return result.stdout


def exposure(h: Host, unit: str) -> float:
    """systemd's own exposure score of `unit` on the host (`systemd-analyze security`; 0 is
    the most locked down, 10 the least); a template instance is scored by its template."""
    out = sh(h, f"systemd-analyze security --no-pager {unit} 2>&1")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out[-2000:]
    return float(found[1])


def ok(proc: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI run that must have succeeded."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a CLI run that must have failed cleanly (no traceback)."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def wait_until(check, seconds: float, what: str):
    """Poll `check()` every 0.5 s until it is truthy (and return it); fail after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {seconds:.0f} s"
        time.sleep(0.5)


def ports_free(ports: list[int]) -> bool:
    """True if every port can be bound on 127.0.0.1 right now."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class Tunnel:
    """`invoke tunnel` to a host, run in the background: the host's 127.0.0.1 services on
    local ports (its ports plus an offset chosen so that every local port is free)."""

    def __init__(self, inv: Path, host_name: str = "e2e", database: bool = False) -> None:
        self.inv = inv
        self.host_name = host_name
        self.database = database
        self.proc: subprocess.Popen | None = None
        self.ports: dict[int, int] = {}  # remote -> local
        self.offset: int | None = None

    def start(self, timeout: float = 60) -> None:
        """Start it (on the same local ports as before, if it ran) and wait up to `timeout`
        until it says it forwards."""
        if self.offset is None:
            self.offset = self._free_offset()
        args = ["tunnel", "--offset", str(self.offset), "--inventory", str(self.inv)]
        args += ["--host", self.host_name] + (["--mysql"] if self.database else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "invoke", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # as from a shell: a test process (an xdist worker) may ignore SIGINT, and Python
            # then gives its child no KeyboardInterrupt for the Ctrl-C `stop` sends
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("invoke tunnel did not start:\n" + "".join(seen))
            seen.append(line)
            if m := re.match(r"127\.0\.0\.1:(\d+) -> \S+:127\.0\.0\.1:(\d+)$", line.strip()):
                self.ports[int(m[2])] = int(m[1])
            if line.startswith("forwarding"):
                return

    def _free_offset(self) -> int:
        # served models are on 54321 and up: their local ports must stay below 65536 too
        wanted = [5000, 8888, 3306, 54321, 54400, 54401, 54402, 54410, 54420]
        for _ in range(200):
            offset = random.randrange(1000, 11000)
            if ports_free([p + offset for p in wanted]):
                return offset
        raise AssertionError("no free local ports for the tunnel")

    def local(self, remote_port: int) -> int:
        """The local port forwarded to the host's 127.0.0.1:`remote_port`."""
        return self.ports[remote_port]

    def url(self, remote_port: int) -> str:
        return f"http://127.0.0.1:{self.local(remote_port)}"

    def stop(self) -> None:
        """Ctrl-C it (as a user stops it)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Open it again (after the host rebooted, say), on the same local ports if they are
        still free (some may have gone to other connections meanwhile), else on new ones."""
        self.stop()
        try:
            self.start()
        except AssertionError as exc:
            if "already in use" not in str(exc):
                raise
            self.offset, self.ports = None, {}
            self.start()
