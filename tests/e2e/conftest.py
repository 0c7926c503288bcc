"""End-to-end fixtures: real sandbox hosts (systemd-nspawn) on the private network, over SSH.

Each fixture states the host it gives: `sandbox` a pristine host for the session,
`fresh_sandbox` pristine hosts made for one test, `stack` the session host provisioned with
every role at the inventory's defaults (services on their default ports, reached from here
through `invoke tunnel`, as on EC2). A test that changes the stack puts it back. Every test
under tests/e2e is marked `e2e` and `slow`; without root and the sandbox tools they skip
(and fail under CI=true).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.sandbox import network
from tests.e2e.helpers import Tunnel, inventory, provision_json

HERE = Path(__file__).parent
OWNER = "e2e-owner"  # file in a sandbox's state dir: pid of the pytest session that made it


def unique_name() -> str:
    """A sandbox name no other session uses."""
    return f"e2e-{uuid.uuid4().hex[:10]}"


def skip_reason() -> str | None:
    """Why e2e tests cannot run on this machine, or None."""
    problem = sb.preflight_problem(need_debootstrap=True)
    return f"no sandbox host here: {problem}" if problem else None


def boot(name: str | None = None, **options) -> sb.SandboxInfo:
    """Boot a new pristine sandbox (private network) owned by this pytest process."""
    info = sb.up(name or unique_name(), **options)
    (info.state_dir / OWNER).write_text(f"{os.getpid()}\n")
    return info


def prune_orphans() -> None:
    """Remove e2e sandboxes whose pytest session is gone (other live sessions keep theirs)."""
    for state in sorted(sb.state_root().glob("e2e-*")):
        owner = state / OWNER
        if owner.exists():
            pid = int(owner.read_text().strip() or 0)
            if pid and Path(f"/proc/{pid}").exists():
                continue
        elif time.time() - state.stat().st_mtime < 3600:
            continue  # maybe still being booted by another session
        sb.down(state.name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e `e2e` and `slow`, skip them when no sandbox can run,
    and put the host-restart test last."""
    reason = skip_reason()
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
    # A test that reboots the session's sandbox goes last (a stable sort keeps the rest's order).
    items.sort(key=lambda item: item.get_closest_marker("host_restart") is not None)


def network_left_behind() -> str | None:
    """With no sandbox running on the machine any more, what of the private network is left
    (the bridge, the NAT table, the namespaces, forwarding), or None. Called once at the end
    of the run, by tests/conftest.py (the xdist controller, after every worker is done)."""
    if skip_reason():
        return None
    from tests.e2e.test_sandbox_net import assert_network_gone

    with network.lock():  # no sandbox is being booted or removed meanwhile
        if any((h := network.holder(a)) and h.running for a in network.leases()):
            return None  # another session's sandboxes still use it
        try:
            assert_network_gone()
        except AssertionError as exc:
            return str(exc) or "the bridge, NAT table, namespaces or forwarding state"
    return None


@pytest.fixture(scope="session")
def sandbox() -> Iterator[sb.SandboxInfo]:
    """A pristine private sandbox for the whole session; always removed at the end."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    prune_orphans()
    info = boot()
    try:
        yield info
    finally:
        sb.down(info.name)


@pytest.fixture
def fresh_sandbox() -> Iterator[Callable[..., sb.SandboxInfo]]:
    """Factory of extra pristine sandboxes (a few seconds each), removed after the test;
    `fresh_sandbox(distro=..., memory=..., address=...)` passes its options to `up`."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[str] = []

    def make(**options) -> sb.SandboxInfo:
        info = boot(**options)
        made.append(info.name)
        return info

    try:
        yield make
    finally:
        for name in made:
            sb.down(name)


@pytest.fixture(scope="session")
def wine_csv() -> Path:
    from tests.data import WINE_CSV

    return WINE_CSV


@pytest.fixture(scope="session")
def data_server(sandbox, wine_csv):
    """An HTTP server on the sandboxes' gateway (the controller, as the hosts see it) serving
    the wine data: the URL a host downloads it from."""
    import http.server
    import threading

    directory = str(wine_csv.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    address = str(network.gateway(network.subnet()))
    server = http.server.ThreadingHTTPServer((address, 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{address}:{server.server_address[1]}/{wine_csv.name}"
    server.shutdown()


# --- the provisioned stack ---------------------------------------------------------------

PORTS = {"mlflow": 5000, "jupyter": 8888, "mysql": 3306}  # the defaults, as on EC2


@dataclass
class Stack:
    """The session's host with every role converged at the inventory's defaults."""

    info: sb.SandboxInfo
    inv: Path  # host `e2e`, alone in the `server` group
    report: dict  # `provision --json` of the cold converge
    output: str  # its stdout and stderr
    tunnel: Tunnel  # `invoke tunnel --mysql` to the host, for the whole session
    ports: dict[str, int] = field(default_factory=lambda: dict(PORTS))

    @property
    def tracking_uri(self) -> str:
        """MLflow, through the tunnel."""
        return self.tunnel.url(self.ports["mlflow"])

    @property
    def jupyter_url(self) -> str:
        return self.tunnel.url(self.ports["jupyter"])

    @property
    def db_port(self) -> int:
        """The database's local end of the tunnel."""
        return self.tunnel.local(self.ports["mysql"])

    def with_vars(self, directory: Path, vars_yaml: str) -> Path:
        """An inventory for the same host with these vars (a test's own variant)."""
        return inventory(directory, self.info, vars_yaml=vars_yaml)


@pytest.fixture(scope="session")
def stack(sandbox, tmp_path_factory) -> Iterator[Stack]:
    """The session sandbox converged once with all roles at their defaults."""
    inv = inventory(tmp_path_factory.mktemp("stack"), sandbox)
    code, report, proc = provision_json(inv)
    assert code == 0 and report, proc.stdout[-3000:] + proc.stderr[-3000:]
    tunnel = Tunnel(inv, database=True)
    tunnel.start()
    try:
        yield Stack(sandbox, inv, report, proc.stdout + proc.stderr, tunnel)
    finally:
        tunnel.stop()
