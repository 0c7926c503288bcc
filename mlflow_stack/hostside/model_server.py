"""A served model (mlflow-model@NAME): MLflow's own scoring app under uvicorn, on the host.

The app is `mlflow.pyfunc.scoring_server.init`, the one `mlflow models serve` runs. Unlike
`mlflow models serve --env-manager local`, it starts Python once; binds its socket before the
slow imports (a busy port fails at once) as IPPROTO_TCP, so every connection gets TCP_NODELAY;
with WORKERS > 1 loads the model once and forks the workers, each on its own SO_REUSEPORT
socket, supervised (a dead worker stops the unit, systemd restarts it); and puts the fast path
of fast_scoring.py (deployed beside it) in front of MLflow's app. Figures: BENCHMARKS.md.

Settings come from the unit's env file: MODEL_URI, BIND, PORT, WORKERS (0: one per CPU) and
ACCESS_LOG (1 logs every request, as `mlflow models serve` does).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time

log = logging.getLogger("mlflow_stack.model_server")


def listen(bind: str, port: int, reuse_port: bool = False, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket; `reuse_port` lets each worker have its own on the same port."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        sys.exit(f"cannot listen on {bind}:{port}: {exc.strerror}")
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def build_app(model_uri: str):
    """MLflow's scoring app for the model, behind the fast path when the model allows it."""
    import uvicorn  # noqa: F401  (imported once, before any fork)
    from mlflow.pyfunc import scoring_server

    if __package__:  # imported from the repository (tests)
        from mlflow_stack.hostside.fast_scoring import FastPathApp, FastScorer
    else:  # on the host, deployed next to this file
        from fast_scoring import FastPathApp, FastScorer

    model = scoring_server.load_model_with_mlflow_config(model_uri)
    app = scoring_server.init(model)
    scorer = FastScorer.for_model(model)
    log.info("fast path (dataframe_split/_records JSON): %s", "on" if scorer else "off (model)")
    return FastPathApp(app, scorer) if scorer else app


def serve(app, sock: socket.socket, access_log: bool) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="info", access_log=access_log)
    uvicorn.Server(config).run(sockets=[sock])


def supervise(children: set[int]) -> int:
    """Wait for the workers; on SIGTERM/SIGINT stop them. A worker that dies on its own
    stops the others: exit 1 so that systemd restarts the unit."""
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            children.discard(pid)
            if not stopping:
                log.error("worker %d exited (status %d); stopping the others", pid, status)
                failed = True
                stop(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    uri = os.environ["MODEL_URI"]
    bind = os.environ.get("BIND", "127.0.0.1")
    port = int(os.environ["PORT"])
    workers = int(os.environ.get("WORKERS", "1")) or len(os.sched_getaffinity(0))
    access_log = os.environ.get("ACCESS_LOG", "0") == "1"

    started = time.monotonic()
    sock = listen(bind, port, reuse_port=workers > 1)
    app = build_app(uri)
    log.info("loaded %s in %.1f s", uri, time.monotonic() - started)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # scans (and, with forked workers, its pages shared).
    gc.collect()
    gc.freeze()
    if workers == 1:
        serve(app, sock, access_log)
        return 0
    children = set()
    for number in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                if number > 0:  # its own socket: the kernel spreads new connections over them
                    sock.close()
                    sock = listen(bind, port, reuse_port=True)
                serve(app, sock, access_log)
                code = 0
            except BaseException:  # os._exit would drop the traceback
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        children.add(pid)
    sock.close()
    log.info("serving %s on %s:%d with %d workers %s", uri, bind, port, workers, sorted(children))
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main())
