"""hostside/tracking_server.py starts MLflow as `mlflow server` would, in one process.

The launcher's environment is compared with the one the installed `mlflow server` hands to
its uvicorn process (captured instead of started), so an MLflow upgrade that changes it fails
here rather than on a host.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parents[2] / "mlflow_stack" / "hostside" / "tracking_server.py"
BOOT_ID = "_MLFLOW_SERVER_BOOT_ID"


def load_launcher():
    spec = importlib.util.spec_from_file_location("mlflow_launcher", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Finished:
    """Stands in for the uvicorn process `mlflow server` would start."""

    pid = 0

    def poll(self):
        return 0

    def wait(self):
        return 0


def mlflow_server_env(monkeypatch, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(uvicorn command, environment) that `mlflow server ARGS` would start uvicorn with."""
    pytest.importorskip("mlflow.server")
    import mlflow.server
    import mlflow.server.handlers
    from click.testing import CliRunner
    from mlflow import cli

    captured: dict = {}

    def exec_cmd(cmd, extra_env=None, **kwargs):
        captured["cmd"], captured["env"] = cmd, dict(extra_env or {})
        return _Finished()

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    monkeypatch.setattr(mlflow.server, "_exec_cmd", exec_cmd)
    monkeypatch.setattr(mlflow.server.handlers, "initialize_backend_stores", lambda *a, **k: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # it would forward to a child
    before = dict(os.environ)
    result = CliRunner().invoke(cli.server, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # `mlflow server` passes some settings to uvicorn through its own os.environ.
    inherited = {k: v for k, v in os.environ.items() if before.get(k) != v}
    os.environ.clear()
    os.environ.update(before)
    return captured["cmd"], {**inherited, **captured["env"]}


@pytest.mark.parametrize("allowed", [None, "203.0.113.10,203.0.113.10:5000"])
def test_launcher_env_is_mlflow_servers(monkeypatch, tmp_path, allowed):
    backend = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--backend-store-uri", backend, "--host", "127.0.0.1", "--port", "5000"]
    args += ["--workers", "1", "--artifacts-destination", str(tmp_path / "artifacts")]
    if allowed:
        args += ["--allowed-hosts", allowed]
    cmd, theirs = mlflow_server_env(monkeypatch, args)
    ours = load_launcher().server_env(backend, str(tmp_path / "artifacts"), allowed)
    assert ours.pop(BOOT_ID) and theirs.pop(BOOT_ID)
    assert ours == theirs
    assert cmd[-1] == load_launcher().APPS[None][0]


def test_launcher_flags_are_the_units():
    launcher = load_launcher()
    flags = "--host 0.0.0.0 --port 5001 --workers 2 --artifacts-destination /a"
    args = launcher.parse_args(
        [*flags.split(), "--allowed-hosts", "h,h:5001", "--app-name", "basic-auth"]
    )
    assert (args.host, args.port, args.workers, args.app_name) == (
        ["0.0.0.0"],
        5001,
        2,
        "basic-auth",
    )
    both = launcher.parse_args(
        ["--host", "127.0.0.1", "--host", "10.0.0.5", "--artifacts-destination", "/a"]
    )
    assert both.host == ["127.0.0.1", "10.0.0.5"]
    assert launcher.APPS["basic-auth"] == ("mlflow.server.auth:create_app", True)


ASGI_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_the_launcher_listens_on_every_address_it_is_given(tmp_path, workers):
    """Loopback for the host's own clients and a private address for tuning workers."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    (tmp_path / "tiny.py").write_text(ASGI_APP)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import importlib.util, sys, uvicorn; "
        f"spec = importlib.util.spec_from_file_location('l', {str(LAUNCHER)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"m.serve_on(['127.0.0.1', '127.0.0.2'], uvicorn.Config('tiny:app', port={port}, "
        f"workers={workers}, log_level='warning'))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        start_new_session=True,
    )
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=2) as r:
                        assert r.read() == b"ok"
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"nothing answers on {address}:{port}"
                    time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
