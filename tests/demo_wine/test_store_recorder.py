"""StoreRecorder: trial runs written straight into the tracking DB, row for row what MLflow's
own SQL store writes for create_run + log_batch + set_terminated (the server's code path)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from demo_wine.recorder import (
    DatabaseStore,
    RecordingError,
    StoreMismatch,
    StoreRecorder,
    TrialRecorder,
    trial_run_id,
)

TABLES = ("runs", "tags", "params", "metrics", "latest_metrics")


def frozen(number: int, state: str = "COMPLETE") -> Any:
    start = datetime(2026, 1, 1) + timedelta(seconds=number)
    return SimpleNamespace(
        number=number,
        state=SimpleNamespace(name=state),
        params={"alpha": 0.1 * (number + 1) / 3, "l1_ratio": 0.5},
        datetime_start=start,
        datetime_complete=start + timedelta(milliseconds=20),
    )


METRICS = {"val_rmse": 0.75, "val_mae": float("nan"), "val_r2": float("inf")}


def rows(db: Path, run_id: str) -> dict[str, list[tuple]]:
    """Every row of the run in the five tables, with the run id replaced by a placeholder."""
    out = {}
    with sqlite3.connect(db) as conn:
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM {table} WHERE run_uuid = ?", (run_id,))
            cols = [c[0] for c in cur.description]
            found = []
            for row in cur.fetchall():
                item = dict(zip(cols, row, strict=True))
                item["run_uuid"] = "<id>"
                if "artifact_uri" in item:
                    item["artifact_uri"] = item["artifact_uri"].replace(run_id, "<id>")
                found.append(tuple(sorted(item.items())))
            out[table] = sorted(found)
    return out


def test_rows_equal_those_of_mlflows_own_store_path(tracking) -> None:
    uri, db, client, exp, parent = tracking
    tags = {"host": "h", "pid": "1", "optuna.study": "s"}

    # Reference: the three calls the server performs on its store for each trial.
    reference = TrialRecorder(client, exp, parent, tags, threads=1)
    direct = StoreRecorder(DatabaseStore(uri, exp, parent, tags), interval=0.01)
    for n, state in ((0, "COMPLETE"), (1, "FAIL")):
        for rec in (reference, direct):
            rec.note(n, METRICS)
            rec(None, frozen(n, state))
    assert reference.close() == direct.close() == 2

    for n in (0, 1):
        ours, theirs = rows(db, direct.run_id(n)), rows(db, reference.run_id(n))
        assert all(ours[t] for t in TABLES)
        assert ours == theirs
    # And MLflow reads them back as the same runs.
    a, b = client.get_run(direct.run_id(0)), client.get_run(reference.run_id(0))
    assert a.data.to_dictionary()["tags"] == b.data.to_dictionary()["tags"]
    assert a.data.params == b.data.params == {"alpha": repr(0.1 / 3), "l1_ratio": "0.5"}
    assert a.info.status == "FINISHED" and client.get_run(direct.run_id(1)).info.status == "FAILED"
    assert a.data.tags["mlflow.parentRunId"] == parent
    assert a.info.artifact_uri == f"mlflow-artifacts:/rec/{a.info.run_id}/artifacts"


def test_a_batch_written_twice_creates_no_second_run(tracking) -> None:
    uri, db, client, exp, parent = tracking
    rec = StoreRecorder(DatabaseStore(uri, exp, parent, {}), interval=0.01)
    for n in range(5):
        rec.note(n, {"val_rmse": 0.8})
        rec(None, frozen(n))
    assert rec.close() == 5
    again = StoreRecorder(DatabaseStore(uri, exp, parent, {}), interval=0.01)
    batch = [rec.records[n] for n in range(7) if n in rec.records]
    assert again.write(batch) == 0  # all present already
    twice = StoreRecorder(DatabaseStore(uri, exp, parent, {}), interval=0.01)
    assert twice.write([replace(rec.records[0], number=5, run_id=trial_run_id(parent, 5))] * 2) == 1
    twice.close()
    again.close()
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(
        trial_run_id(parent, n) for n in range(6)
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 6


def test_refuses_a_database_without_the_parent_run(tracking, tmp_path: Path) -> None:
    uri, _, _, exp, _ = tracking
    with pytest.raises(StoreMismatch, match="not in this database"):
        StoreRecorder(DatabaseStore(uri, exp, "0" * 32, {}))


def test_refuses_a_schema_that_is_not_at_mlflows_head(tracking) -> None:
    uri, db, _, exp, parent = tracking
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'abc123'")
    with pytest.raises(StoreMismatch, match="out-of-date database schema"):
        StoreRecorder(DatabaseStore(uri, exp, parent, {}))


def test_unwritable_trials_raise_on_close(tracking) -> None:
    uri, db, _, exp, parent = tracking
    rec = StoreRecorder(DatabaseStore(uri, exp, parent, {}), interval=0.01, patience_s=0)
    with sqlite3.connect(db) as conn:  # make every insert into `runs` fail
        conn.execute(
            "CREATE TRIGGER no_runs BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    for n in range(3):
        rec(None, frozen(n))
    with pytest.raises(RecordingError, match="3 of 3 trials have no MLflow run"):
        rec.close()


def test_a_database_outage_only_delays_the_runs(tracking) -> None:
    """Writes that fail for a while (a database restart) are retried until they succeed."""
    uri, db, client, exp, parent = tracking
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER no_runs BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'down'); END"
        )
    rec = StoreRecorder(DatabaseStore(uri, exp, parent, {}), interval=0.01, patience_s=60)
    for n in range(4):
        rec.note(n, {"val_rmse": 0.8})
        rec(None, frozen(n))
    import time

    time.sleep(1.0)  # the writer is failing and retrying meanwhile
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1  # the parent
        conn.execute("DROP TRIGGER no_runs")
    assert rec.close() == 4
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4
