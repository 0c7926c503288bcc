"""The record service: trial runs written for a client that holds no database credential,
row for row as the direct path writes them; only allowed accounts; every field checked."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from demo_wine import record_service
from demo_wine.recorder import (
    DatabaseStore,
    ServiceStore,
    StoreMismatch,
    StoreRecorder,
)
from tests.demo_wine.test_store_recorder import METRICS, TABLES, frozen, rows


def serve(path: Path, store_uri: str, allowed: set[int]) -> record_service.Service:
    """A service on `path` answering in the background (as the unit runs it, minus systemd)."""
    service = record_service.Service(store_uri, allowed)
    listener = record_service.listening_socket(str(path))

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=service.handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return service


def test_runs_through_the_service_equal_the_direct_ones(tracking, tmp_path: Path) -> None:
    uri, db, client, exp, parent = tracking
    path = tmp_path / "rec.sock"
    serve(path, uri, {os.getuid()})
    tags = {"host": "h", "pid": "1", "optuna.study": "s"}
    via = StoreRecorder(ServiceStore(str(path), exp, parent, tags), interval=0.01)
    other = client.create_run(exp, tags={"role": "tuning"}).info.run_id
    direct = StoreRecorder(DatabaseStore(uri, exp, other, tags), interval=0.01)
    for n, state in ((0, "COMPLETE"), (1, "FAIL")):
        for rec in (via, direct):
            rec.note(n, METRICS)
            rec(None, frozen(n, state))
    assert via.close() == direct.close() == 2
    for n in (0, 1):
        ours, theirs = rows(db, via.run_id(n)), rows(db, direct.run_id(n))
        assert all(ours[t] for t in TABLES)
        for table in TABLES:  # the parent run id is the only difference
            assert [str(r).replace(parent, "P") for r in ours[table]] == [
                str(r).replace(other, "P") for r in theirs[table]
            ]
    run = client.get_run(via.run_id(0))
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.metrics["val_rmse"] == 0.75


def test_an_account_not_allowed_is_refused(tracking, tmp_path: Path) -> None:
    uri, _, _, exp, parent = tracking
    path = tmp_path / "rec.sock"
    serve(path, uri, {os.getuid() + 4242})  # not us
    with pytest.raises(StoreMismatch, match="this account may not record runs"):
        ServiceStore(str(path), exp, parent, {})


def test_a_parent_run_that_is_not_there_is_refused(tracking, tmp_path: Path) -> None:
    uri, _, _, exp, _ = tracking
    path = tmp_path / "rec.sock"
    serve(path, uri, {os.getuid()})
    with pytest.raises(StoreMismatch, match="is not in this database"):
        ServiceStore(str(path), exp, "0" * 32, {})


def ask(path: Path, *requests: object) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        f = sock.makefile("rwb")
        answers = []
        for request in requests:
            f.write(
                (request if isinstance(request, bytes) else json.dumps(request).encode()) + b"\n"
            )
            f.flush()
            answers.append(json.loads(f.readline()))
        return answers


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (b"not json", "Expecting value"),
        ({"write": []}, "open first"),
        ({"drop": "everything"}, "a request is one of"),
        ({"open": {"experiment_id": "1; DROP", "parent_run_id": "x"}}, "experiment_id"),
        ({"open": {"experiment_id": "0", "parent_run_id": "../x"}}, "parent_run_id"),
        (
            {
                "open": {
                    "experiment_id": "0",
                    "parent_run_id": "0" * 32,
                    "tags": {"mlflow.user": "x"},
                }
            },
            "mlflow.* tags are the service's own",
        ),
        (
            {"open": {"experiment_id": "0", "parent_run_id": "0" * 32, "tags": {"a\nb": "x"}}},
            "tag key",
        ),
    ],
)
def test_bad_requests_are_answered_with_an_error(tracking, tmp_path, request_, error) -> None:
    uri, *_ = tracking
    path = tmp_path / "rec.sock"
    serve(path, uri, {os.getuid()})
    (answer,) = ask(path, request_)
    assert error in answer["error"]


GOOD = {"number": 1, "state": "FAIL", "start_ms": 0, "end_ms": 0}


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"number": -1, "state": "COMPLETE", "start_ms": 0, "end_ms": 0}, "number"),
        ({"number": 1, "state": "RUNNING", "start_ms": 0, "end_ms": 0}, "state"),
        ({"number": 1, "state": "COMPLETE", "start_ms": "0", "end_ms": 0}, "start_ms"),
        (
            {"number": 1, "state": "FAIL", "start_ms": 0, "end_ms": 0, "metrics": {"m": "1"}},
            "metric",
        ),
        (
            {"number": 1, "state": "FAIL", "start_ms": 0, "end_ms": 0, "params": {"p": "x" * 7000}},
            "param",
        ),
    ],
)
def test_bad_records_write_nothing(tracking, tmp_path, record, error) -> None:
    uri, _, client, exp, parent = tracking
    path = tmp_path / "rec.sock"
    serve(path, uri, {os.getuid()})
    hello = {"open": {"experiment_id": exp, "parent_run_id": parent, "tags": {}}}
    ok, answer = ask(path, hello, {"write": [record]})
    assert ok == {"ok": True} and error in answer["error"]
    assert not client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
