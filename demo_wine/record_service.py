"""The record service: writes tuning trials as MLflow runs for processes that must not hold the
tracking database's credential.

On a provisioned host it runs as the tracking server's account (`mlflow-recorder.service`,
started by systemd when a client connects to `mlflow-recorder.socket`), reads the store URI
from the server's environment file and exits after `--idle` seconds without clients. A client
(`recorder.ServiceStore`) sends one JSON line per request and reads one back:

    {"open": {"experiment_id": "1", "parent_run_id": "…", "tags": {...}}}  -> {"ok": true}
    {"write": [{"number": 0, "state": "COMPLETE", "params": {...}, "metrics": {...},
                "start_ms": …, "end_ms": …}, ...]}                          -> {"inserted": n}

Only the accounts named by `--allow` (and root) may connect (SO_PEERCRED). A client can do
what MLflow's REST API already lets anyone who reaches the server do, no more: create finished
child runs with params, metrics and tags under an existing active parent run. Every field is
checked; the rows and run ids are the service's own (`recorder.DatabaseStore`).

    python -m demo_wine.record_service [--socket PATH] [--allow demo] [--idle 120]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import re
import socket
import struct
import sys
import threading
import time
from typing import Any

from demo_wine.activation import systemd_socket
from demo_wine.recorder import DatabaseStore, StoreMismatch, TrialRecord

STORE_ENV = "MLFLOW_BACKEND_STORE_URI"
STATES = ("COMPLETE", "FAIL", "PRUNED")
KEY = re.compile(r"^[\w./\- ]{1,250}$")  # MLflow's key rule
MAX_VALUE = 6000  # MLflow's param value limit (tags allow more; the same bound is enough here)
MAX_BATCH = 2000
MAX_LINE = 8 * 1024 * 1024


class BadRequest(ValueError):
    """A request the service refuses; its message goes back to the client."""


def check_key(key: object, what: str) -> str:
    if not isinstance(key, str) or not KEY.match(key):
        raise BadRequest(f"{what} key {key!r}: letters, digits, _ - . / and spaces, 1-250")
    return key


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_VALUE or "\0" in value:
        raise BadRequest(f"{what}: a string of at most {MAX_VALUE} characters")
    return value


def check_tags(tags: object) -> dict[str, str]:
    if not isinstance(tags, dict) or len(tags) > 100:
        raise BadRequest("tags: an object of at most 100 entries")
    out = {check_key(k, "tag"): check_text(v, f"tag {k}") for k, v in tags.items()}
    if any(k.startswith("mlflow.") and k != "mlflow.source.name" for k in out):
        raise BadRequest("tags: mlflow.* tags are the service's own")
    return out


def check_number(value: object, what: str) -> float:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what}: a number")
    return float(value)


def check_int(value: object, what: str, low: int = 0, high: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{what}: a whole number from {low} to {high}")
    return value


def check_record(raw: object) -> TrialRecord:
    """A trial record from a request, every field checked."""
    if not isinstance(raw, dict):
        raise BadRequest("a record must be an object")
    state = raw.get("state")
    if state not in STATES:
        raise BadRequest(f"state {state!r}: one of {', '.join(STATES)}")
    params = raw.get("params", {})
    metrics = raw.get("metrics", {})
    if not isinstance(params, dict) or not isinstance(metrics, dict):
        raise BadRequest("params and metrics must be objects")
    if len(params) > 100 or len(metrics) > 100:
        raise BadRequest("at most 100 params and 100 metrics per trial")
    clean_params: dict[str, Any] = {}
    for k, v in params.items():
        check_key(k, "param")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        clean_params[k] = v if number else check_text(v, f"param {k}")  # as Optuna gave it
    clean_metrics = {
        check_key(k, "metric"): check_number(v, f"metric {k}") for k, v in metrics.items()
    }
    start = check_int(raw.get("start_ms"), "start_ms")
    end = check_int(raw.get("end_ms"), "end_ms")
    return TrialRecord(
        number=check_int(raw.get("number"), "number", 0, 10**9),
        state=state,
        params=clean_params,
        metrics=clean_metrics,
        start_ms=start,
        end_ms=max(start, end),
    )


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Service:
    """Answers clients, one thread each; counts them for the idle exit."""

    def __init__(self, store_uri: str, allowed: set[int]) -> None:
        self.store_uri = store_uri
        self.allowed = allowed
        self.active = 0
        self.last_seen = time.monotonic()
        self.lock = threading.Lock()

    def handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.active += 1
        try:
            if peer_uid(conn) not in self.allowed:
                self.reply(conn.makefile("wb"), {"error": "this account may not record runs"})
                return
            self.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.active -= 1
                self.last_seen = time.monotonic()

    def serve(self, conn: socket.socket) -> None:
        reader, writer = conn.makefile("rb"), conn.makefile("wb")
        store: DatabaseStore | None = None
        try:
            while line := reader.readline(MAX_LINE):
                try:
                    store, answer = self.answer(store, json.loads(line))
                except (BadRequest, StoreMismatch, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    answer = {"error": str(exc) or type(exc).__name__}
                except Exception as exc:  # the database: the client retries
                    answer = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                self.reply(writer, answer)
        finally:
            if store is not None:
                store.close()

    def answer(
        self, store: DatabaseStore | None, request: object
    ) -> tuple[DatabaseStore | None, dict]:
        if not isinstance(request, dict) or len(request) != 1:
            raise BadRequest('a request is one of {"open": …} or {"write": […]}')
        if "open" in request:
            hello = request["open"]
            if store is not None or not isinstance(hello, dict):
                raise BadRequest("open once, with an object")
            experiment = str(hello.get("experiment_id", ""))
            if not experiment.isdigit() or len(experiment) > 18:
                raise BadRequest("experiment_id: an experiment id (digits)")
            parent = hello.get("parent_run_id")
            if not isinstance(parent, str) or not re.fullmatch(r"[0-9a-f]{32}", parent):
                raise BadRequest("parent_run_id: a run id (32 hex digits)")
            tags = check_tags(hello.get("tags", {}))
            return DatabaseStore(self.store_uri, experiment, parent, tags), {"ok": True}
        if "write" in request:
            if store is None:
                raise BadRequest("open first")
            batch = request["write"]
            if not isinstance(batch, list) or not 0 < len(batch) <= MAX_BATCH:
                raise BadRequest(f"write: a list of 1 to {MAX_BATCH} records")
            records = [check_record(raw) for raw in batch]
            return store, {"inserted": store.write(records)}
        raise BadRequest('a request is one of {"open": …} or {"write": […]}')

    @staticmethod
    def reply(writer, answer: dict) -> None:
        writer.write(json.dumps(answer, default=_finite).encode() + b"\n")
        writer.flush()

    def idle_for(self) -> float:
        with self.lock:
            return 0.0 if self.active else time.monotonic() - self.last_seen


def _finite(value: object) -> object:
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else str(value)


def listening_socket(path: str | None) -> socket.socket:
    """The socket systemd handed over (socket activation), else a new one bound at `path`."""
    handed = systemd_socket()
    if handed is not None:
        return handed
    if not path:
        raise SystemExit("no socket: give --socket PATH (or start it by socket activation)")
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # access is decided by peer credentials
    sock.listen(16)
    return sock


def allowed_uids(names: list[str]) -> set[int]:
    uids = {0}
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise SystemExit(f"--allow {name}: no such account") from None
    return uids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="bind here (default: the socket systemd hands over)")
    parser.add_argument("--allow", action="append", default=[], help="an account that may record")
    parser.add_argument("--idle", type=float, default=0, help="exit after this many idle seconds")
    args = parser.parse_args(argv)
    store_uri = os.environ.get(STORE_ENV, "").strip()
    if not store_uri:
        raise SystemExit(f"{STORE_ENV} is not set (the server's environment file)")
    service = Service(store_uri, allowed_uids(args.allow))
    listener = listening_socket(args.socket)
    listener.settimeout(1.0)
    while not (args.idle and service.idle_for() > args.idle):
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        threading.Thread(target=service.handle, args=(conn,), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
