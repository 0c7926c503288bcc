"""End-to-end fixtures: a real sandbox host (systemd-nspawn) reached over SSH.

`sandbox` boots one pristine host per test session (skipped with the reason when this machine
cannot run it); `fresh_sandbox` makes extra pristine hosts for tests that need their own.
Every test in tests/e2e is marked `e2e`.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlflow_stack import sandbox as sb

HERE = Path(__file__).parent
OWNER = "e2e-owner"  # file in a sandbox's state dir: pid of the pytest session that made it


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_name() -> str:
    """A sandbox name no other session uses."""
    return f"e2e-{uuid.uuid4().hex[:10]}"


def skip_reason() -> str | None:
    """Why e2e tests cannot run on this machine, or None."""
    problem = sb.preflight_problem(need_debootstrap=not sb.tarball_path().exists())
    return f"no sandbox host here: {problem}" if problem else None


def boot(name: str | None = None) -> sb.SandboxInfo:
    """Boot a new pristine sandbox owned by this pytest process."""
    info = sb.up(name or unique_name(), free_port())
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
    """Mark every test under tests/e2e `e2e`, skip them when no sandbox can run, and put the
    host-restart test last."""
    reason = skip_reason()
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
    # A test that reboots the session's sandbox goes last (a stable sort keeps the rest's order).
    items.sort(key=lambda item: item.get_closest_marker("host_restart") is not None)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[sb.SandboxInfo]:
    """A running pristine sandbox for the whole session; always removed at the end."""
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
def fresh_sandbox() -> Iterator[Callable[[], sb.SandboxInfo]]:
    """Factory of extra pristine sandboxes (a few seconds each), removed after the test."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[str] = []

    def make() -> sb.SandboxInfo:
        info = boot()
        made.append(info.name)
        return info

    try:
        yield make
    finally:
        for name in made:
            sb.down(name)


# --- the provisioned stack, shared by the stack and action tests ------------------------

# Non-default ports: sandboxes share the machine's network, so a developer's own sandbox
# (on the defaults) keeps running while the tests provision theirs. They also prove that
# every port is configurable.
STACK_PORTS = {"mlflow": 15000, "jupyter": 18888, "mysql": 13306}


@pytest.fixture(scope="session")
def wine_csv() -> Path:
    from tests.data import WINE_CSV

    return WINE_CSV


@pytest.fixture(scope="session")
def data_server(wine_csv):
    """A local HTTP server the sandbox downloads the data from (loopback is shared)."""
    import http.server
    import threading

    directory = str(wine_csv.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{wine_csv.name}"
    server.shutdown()


@pytest.fixture(scope="session")
def stack(sandbox, tmp_path_factory, data_server):
    """The session sandbox converged once with all roles (data downloaded over HTTP)."""
    from tests.e2e.helpers import inventory, provision_json

    tmp = tmp_path_factory.mktemp("stack")
    p = STACK_PORTS
    vars_yaml = (
        f"mlflow: {{port: {p['mlflow']}}}\njupyter: {{port: {p['jupyter']}}}\n"
        f"mysql: {{port: {p['mysql']}}}\ndemo: {{data_url: '{data_server}'}}"
    )
    inv = inventory(tmp, sandbox, vars_yaml=vars_yaml)
    code, report, proc = provision_json(inv)
    assert code == 0 and report, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "inv": inv,
        "info": sandbox,
        "report": report,
        "proc": proc,
        "ports": p,
        "tracking_uri": f"http://127.0.0.1:{p['mlflow']}",
    }
