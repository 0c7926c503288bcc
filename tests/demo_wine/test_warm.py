"""The warm runner: real server and client processes on a temp Unix socket, a probe module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.demo_wine.conftest import REPO

PROBE = "tests.demo_wine.warm_probe"


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path):
    """A warm server for the probe module, watching one file; yields (socket, watched, proc)."""
    sock, watched = tmp_path / "warm.sock", tmp_path / "code.py"
    watched.write_text("v1\n")
    launcher = (
        "import sys\nfrom pathlib import Path\nfrom demo_wine.warm import serve_forever\n"
        f"sys.exit(serve_forever(sys.argv[1], served=({PROBE!r},), imports=('json',), "
        "watched=[Path(sys.argv[2])]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(sock), str(watched)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(sock.exists)
    yield sock, watched, proc
    proc.kill()
    proc.wait()


def client(sock: Path, *args: str, cwd: Path, stdin: str = "hello\n", **kwargs):
    env = {**os.environ, "DEMO_WINE_WARM_SOCKET": str(sock), "PROBE": "p1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "demo_wine.warm", "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        **kwargs,
    )


def test_a_run_is_forked_from_the_server_with_the_clients_stdio_env_cwd_and_exit_code(
    server, tmp_path
):
    sock, _, _ = server
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = client(sock, PROBE, "3", cwd=workdir)
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == [
        "mark=warm",
        f"cwd={workdir}",
        "probe=p1",
        "stdin=hello",
        f"umask={os.umask(0o22):o}",
        "comm=warm_probe",  # what ps and pkill -x see: the run, not the server
        "thread done",
        "atexit ran",
    ]
    assert proc.stderr == "to stderr\n"


def test_without_a_server_the_client_runs_the_module_itself(tmp_path):
    proc = client(tmp_path / "none.sock", PROBE, "0", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[:4] == [
        "mark=cold",
        f"cwd={tmp_path}",
        "probe=p1",
        "stdin=hello",
    ]


def test_a_module_it_does_not_serve_runs_cold(server, tmp_path):
    sock, _, _ = server
    proc = subprocess.run(
        [sys.executable, "-m", "demo_wine.warm", "run", "json.tool", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "DEMO_WINE_WARM_SOCKET": str(sock)},
        timeout=60,
    )
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_a_changed_watched_file_makes_the_server_stale_and_the_run_cold(server, tmp_path):
    sock, watched, proc = server
    assert "mark=warm" in client(sock, PROBE, "0", cwd=tmp_path).stdout
    watched.write_text("v2, a longer line\n")
    stale = client(sock, PROBE, "0", cwd=tmp_path)
    assert stale.returncode == 0 and "mark=cold" in stale.stdout
    assert proc.wait(timeout=30) == 0  # the stale server exits for systemd to start anew
    assert "changed: exiting" in proc.stderr.read()


def test_a_client_that_goes_away_takes_its_run_with_it(server, tmp_path):
    sock, _, _ = server
    pidfile = tmp_path / "run.pid"
    env = {**os.environ, "DEMO_WINE_WARM_SOCKET": str(sock), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo_wine.warm", "run", PROBE, "0", str(pidfile)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    proc.stdin.write(b"x\n")
    proc.stdin.flush()
    wait_for(pidfile.exists)
    run_pid = int(pidfile.read_text())
    assert run_pid != proc.pid
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    wait_for(lambda: not Path(f"/proc/{run_pid}").exists() or _zombie(run_pid))


def test_runs_overlap(server, tmp_path):
    sock, _, _ = server
    env = {**os.environ, "DEMO_WINE_WARM_SOCKET": str(sock), "PYTHONPATH": str(REPO)}
    pidfiles = [tmp_path / f"run{i}.pid" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "demo_wine.warm", "run", PROBE, "0", str(p)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=tmp_path,
            env=env,
        )
        for p in pidfiles
    ]
    for p in pidfiles:  # both runs are alive at once: the server does not serialise them
        wait_for(p.exists)
    for proc in procs:
        proc.kill()
        proc.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def test_a_malformed_request_is_dropped_with_its_descriptors(server, tmp_path):
    import socket

    sock, _, proc = server
    assert client(sock, PROBE, "0", cwd=tmp_path).returncode == 0
    open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    for payload in (b"xx", b"\x00\x00\x00\x05[1,2", b"\x00\x00\x00\x02[]"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(str(sock))
            socket.send_fds(bad, [payload], [0, 1, 2])
            bad.shutdown(socket.SHUT_WR)
            assert bad.recv(1) == b""  # no answer: the server just closes
    assert "mark=warm" in client(sock, PROBE, "0", cwd=tmp_path).stdout  # still serving
    assert len(os.listdir(f"/proc/{proc.pid}/fd")) == open_fds


def activated_server(tmp_path: Path, idle: float):
    """A warm server started as systemd starts it on demand: the listening socket is handed
    over (systemd-socket-activate, LISTEN_FDS) at the first connection, with `--idle`."""
    sock = tmp_path / "activated.sock"
    launcher = (
        "import sys\nfrom demo_wine.warm import serve_forever\n"
        f"sys.exit(serve_forever({str(tmp_path / 'never-bound.sock')!r}, "
        f"served=({PROBE!r},), imports=('json',), watched=[], idle={idle}))"
    )
    proc = subprocess.Popen(
        # the activator passes its children no environment but what -E names
        [
            "systemd-socket-activate",
            "-l",
            str(sock),
            "-E",
            f"PYTHONPATH={REPO}",
            sys.executable,
            "-c",
            launcher,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(sock.exists)
    return sock, proc


def test_started_by_its_socket_it_serves_then_exits_when_idle(tmp_path):
    sock, proc = activated_server(tmp_path, idle=1.0)
    try:
        first = client(sock, PROBE, "3", cwd=tmp_path)
        assert first.returncode == 3 and "mark=warm" in first.stdout  # the handed socket
        assert not (tmp_path / "never-bound.sock").exists()  # it bound none of its own
        assert proc.wait(timeout=30) == 0
        assert "no run for 1 s: exiting" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_run_longer_than_the_idle_time_keeps_the_server(tmp_path):
    sock, proc = activated_server(tmp_path, idle=0.5)
    pidfile = tmp_path / "run.pid"
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "demo_wine.warm", "run", PROBE, "0", str(pidfile)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "DEMO_WINE_WARM_SOCKET": str(sock), "PYTHONPATH": str(REPO)},
        )
        run.stdin.write("x\n")
        run.stdin.flush()
        wait_for(pidfile.exists)
        time.sleep(2.0)  # four idle periods while the run goes on
        assert proc.poll() is None
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        run.wait(timeout=30)
        assert proc.wait(timeout=30) == 0  # idle once the run is over
    finally:
        proc.kill()
        proc.wait()
