"""A warm process for the demo's CLIs: the heavy libraries imported once, one fork per run.

``python -m demo_wine.warm serve [SOCKET]`` (the unit ``demo-wine-warm.service``) binds a Unix
socket, imports MLflow, scikit-learn, pandas and matplotlib, then serves runs.
``python -m demo_wine.warm run MODULE [ARGS...]`` hands the server its stdin, stdout and stderr
(the file descriptors themselves), its environment, working directory and umask; the server
forks a child that runs ``python -m MODULE ARGS`` there, and the client exits with the child's
exit code. Closing the client (Ctrl-C, a lost SSH session) kills the run.

The client runs the module itself (cold, same result, only slower) when there is no server,
when the server refuses (another user; a module it does not serve) or when the server is
stale: the demo code or the env's packages changed since it started. A stale server exits
after refusing, and systemd starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from demo_wine.activation import systemd_socket

DEFAULT_SOCKET = "/run/demo-wine/warm.sock"
SOCKET_ENV = "DEMO_WINE_WARM_SOCKET"
MARK_ENV = "DEMO_WINE_PROCESS"  # "warm" in a forked run; a cold run leaves it unset
SERVED = ("demo_wine.train", "demo_wine.tune")
WARM_IMPORTS = (
    "numpy",
    "pandas",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
    "matplotlib",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "mlflow",
    "mlflow.sklearn",
    "mlflow.models",
    "mlflow.models.signature",
    "mlflow.models.display_utils",
    "mlflow.pyfunc",
    "optuna",
    "mlflow.tracing.export",
    "mlflow.tracking.request_header.registry",
    "opentelemetry.sdk.metrics",
    "pyarrow.pandas_compat",
    "multiprocessing.popen_fork",
    "netrc",
    "mlflow.tracking.context.registry",
    "mlflow.tracking.context.git_context",
    "git",
    "IPython",
    "cloudpickle",
    "demo_wine.data",
    "demo_wine.model",
    "demo_wine.tracking",
    "demo_wine.artifacts",
    "demo_wine.errors",
)
ACCEPT_WAIT_S = 120.0  # a server still importing makes the client wait this long at most
STOP_GRACE_S = 10.0

ACCEPTED, REFUSED, STALE, EXITED = b"A", b"R", b"S", b"X"
_HEADER = struct.Struct("!I")
_EXIT = struct.Struct("!i")


# ---- the client -------------------------------------------------------------------------


def run(module: str, args: Sequence[str], socket_path: str | None = None) -> int:
    """Run ``python -m module args`` in the warm server, or cold here when it cannot."""
    path = socket_path or os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)
    code = _run_warm(path, module, list(args))
    if code is None:
        _exec_cold(module, args)
    return code


def _run_warm(path: str, module: str, args: list[str]) -> int | None:
    """The run's exit code, or None when the server is absent, refuses or is stale."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return None
    with sock:
        umask = os.umask(0)
        os.umask(umask)
        request = {
            "module": module,
            "args": args,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "umask": umask,
        }
        payload = json.dumps(request).encode()
        try:
            socket.send_fds(sock, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
            sock.settimeout(ACCEPT_WAIT_S)
            answer = sock.recv(1)
        except OSError:
            return None
        if answer != ACCEPTED:
            return None
        sock.settimeout(None)
        tail = _recv_exactly(sock, 1 + _EXIT.size)
    if tail is None or tail[:1] != EXITED:
        sys.stderr.write("error: the warm runner stopped during the run (it was restarted?)\n")
        return 1
    return _EXIT.unpack(tail[1:])[0]


def _exec_cold(module: str, args: Sequence[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---- the server -------------------------------------------------------------------------


def serve(
    path: str,
    served: Sequence[str] = SERVED,
    imports: Sequence[str] = WARM_IMPORTS,
    watched: Sequence[Path] | None = None,
    idle: float = 0,
) -> dict | None:
    """Accept runs until stale, or (`idle` > 0) until no run for `idle` seconds (then None);
    returns a request only in a forked run child. Started by its socket (systemd passes the
    listener), it exits when idle and the next run starts it again."""
    listener = systemd_socket() or _bind(path)
    listener.settimeout(min(5.0, idle) if idle else 5.0)  # wake up to reap, to notice idleness
    runs: set[int] = set()
    last_run = time.monotonic()
    watched = list(watched) if watched is not None else _watched_paths()
    started = _fingerprint(watched)
    _warm_up(imports)
    if threading.active_count() > 1:  # forking a threaded process can deadlock the child
        names = ", ".join(t.name for t in threading.enumerate())
        _log(f"warning: threads after the warm-up ({names}); runs may hang")
    _log(f"ready on {path} (warm-up {time.process_time():.1f} s CPU)")
    while True:
        if _reap(runs):
            last_run = time.monotonic()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if idle and not runs and time.monotonic() - last_run > idle:
                _log(f"no run for {idle:.0f} s: exiting (the next run starts it again)")
                return None
            continue
        request, fds = _receive(conn)
        if request is None:
            conn.close()
            continue
        verdict = _judge(conn, request, served, watched, started)
        if verdict != ACCEPTED:
            _answer(conn, verdict)
            _close(conn, fds)
            if verdict == STALE:
                _log("the demo code or its env changed: exiting for a fresh start")
                return None
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            return _supervise(conn, request, fds)
        runs.add(pid)
        _close(conn, fds)


def _bind(path: str) -> socket.socket:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


def _warm_up(imports: Sequence[str]) -> None:
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional library: the run imports it (or not) itself
            _log(f"not preloaded: {name} ({exc})")
    _prime_mlflow()


def _prime_mlflow() -> None:
    """Run MLflow's pure, cached preparations once, for every forked run to inherit: the map
    of installed packages to modules that each `log_model` consults (≈ 1 s of CPU to build;
    a new package makes the server stale), and signature inference's own lazy imports."""
    try:
        import numpy as np
        import pandas as pd
        from mlflow.models import infer_signature
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
        infer_signature(pd.DataFrame({"x": [1.0, 2.0]}), np.array([1.0, 2.0]))
    except Exception as exc:  # only slower without it: each run builds what it needs itself
        _log(f"MLflow not primed: {exc!r}")


def _watched_paths() -> list[Path]:
    """The demo code (its directory too: files added or removed) and the env's site-packages
    (packages installed, upgraded or removed): a change there makes the server stale."""
    here = Path(__file__).resolve().parent
    paths = [here, *here.glob("*.py")]
    paths += [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    return paths


def _fingerprint(paths: Sequence[Path]) -> tuple:
    stamps = []
    for p in paths:
        try:
            st = p.stat()
            stamps.append((str(p), st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            stamps.append((str(p), None, None))
    return tuple(stamps)


def _judge(conn, request: dict, served, watched, started) -> bytes:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid() or request.get("module") not in served:
        return REFUSED
    return STALE if _fingerprint(watched) != started else ACCEPTED


def _receive(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """The request and the client's three descriptors; (None, []) for anything malformed,
    with whatever descriptors came along closed."""
    fds: list[int] = []
    try:
        conn.settimeout(10.0)
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        body = data[_HEADER.size :]
        (size,) = _HEADER.unpack(data[: _HEADER.size])
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        request = json.loads(body)
        if len(fds) != 3 or not isinstance(request, dict):
            raise ValueError("not a run request")
    except (OSError, ValueError, struct.error):
        _close(None, fds)
        return None, []
    conn.settimeout(None)
    return request, fds


def _answer(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(data)


def _close(conn: socket.socket | None, fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
    if conn is not None:
        conn.close()


def _reap(runs: set[int]) -> bool:
    """Collect finished run supervisors (forgotten in `runs`); True if any finished."""
    done = False
    try:
        while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
            runs.discard(pid)
            done = True
    except ChildProcessError:
        runs.clear()
    return done


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> dict | None:
    """In the per-run child: fork the run, then report its exit or kill it if the client left.

    Returns the request in the run's own process (grandchild); never returns otherwise."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        request["fds"] = fds
        return request
    _close(None, fds)
    _answer(conn, ACCEPTED)
    pidfd = os.pidfd_open(pid)
    readable, _, _ = select.select([conn, pidfd], [], [])
    if pidfd not in readable:  # the client is gone: stop the run and everything it started
        _signal_group(pid, signal.SIGTERM)
        if not select.select([pidfd], [], [], STOP_GRACE_S)[0]:
            _signal_group(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    _answer(conn, EXITED + _EXIT.pack(code if code >= 0 else 128 - code))
    conn.close()
    os._exit(0)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the run's process group (the run itself before it has made one)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return
        except ProcessLookupError:
            continue


def become_run(request: dict) -> None:
    """Turn this forked child into ``python -m MODULE ARGS`` as the client would have run it."""
    os.setsid()
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[MARK_ENV] = "warm"
    _name_process(request["module"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m` puts it first
    os.umask(request["umask"])
    if os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # a fresh process seeds numpy's global generator from the OS
        numpy.random.seed()


def _name_process(module: str) -> None:
    """Name this run after its module (``ps``, ``top`` and ``pkill -x`` see it, not another
    warm server): the module if it fits the kernel's 15 bytes, else its last part."""
    name = module if len(module) <= 15 else module.rsplit(".", 1)[-1]
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _log(message: str) -> None:
    print(f"demo_wine.warm: {message}", file=sys.stderr, flush=True)


def serve_forever(
    path: str,
    served: Sequence[str] = SERVED,
    imports: Sequence[str] = WARM_IMPORTS,
    watched: Sequence[Path] | None = None,
    idle: float = 0,
) -> int:
    """`serve`, and in each forked run child: run the requested module as ``__main__``."""
    request = serve(path, served, imports, watched, idle)
    if request is None:
        return 0
    become_run(request)
    import runpy

    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    _exit_quickly(code)


def _exit_code(value: object) -> int:
    """The process exit code `sys.exit(value)` gives."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _exit_quickly(code: int) -> None:
    """End a run as the interpreter would (wait for its threads, run its exit handlers, flush)
    but without tearing down the whole warm heap module by module (≈ 1.5 s)."""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "run":
        return run(args[1], args[2:])
    idle = 0.0
    if len(args) >= 3 and args[-2] == "--idle":
        try:
            idle = float(args[-1])
        except ValueError:
            idle = -1.0
        args = args[:-2]
    if args[:1] == ["serve"] and len(args) <= 2 and idle >= 0:
        return serve_forever(args[1] if len(args) == 2 else DEFAULT_SOCKET, idle=idle)
    sys.stderr.write(
        "usage: python -m demo_wine.warm serve [SOCKET] [--idle SECONDS] | run MODULE [ARGS...]\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
