"""TrialRecorder against a fake client: request shape per trial, retries, missing runs."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from demo_wine.recorder import RecordingError, TrialRecorder


class FakeClient:
    def __init__(self, fail_log_batch: int = 0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_log_batch = fail_log_batch
        self.lock = threading.Lock()
        self.runs = 0

    def create_run(self, experiment_id: str, start_time: int, tags: dict, run_name: str) -> Any:
        with self.lock:
            self.runs += 1
            run_id = f"r{self.runs}"
            self.calls.append(("create", (experiment_id, tags, run_name)))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id: str, metrics: list, params: list) -> None:
        with self.lock:
            if self.fail_log_batch:
                self.fail_log_batch -= 1
                raise ConnectionError("server went away")
            self.calls.append(("batch", (run_id, metrics, params)))

    def set_terminated(self, run_id: str, status: str, end_time: int) -> None:
        with self.lock:
            self.calls.append(("end", (run_id, status)))


def frozen(number: int, state: str = "COMPLETE") -> Any:
    start = datetime(2026, 1, 1) + timedelta(seconds=number)
    return SimpleNamespace(
        number=number,
        state=SimpleNamespace(name=state),
        params={"alpha": 0.1 * (number + 1), "l1_ratio": 0.5},
        datetime_start=start,
        datetime_complete=start + timedelta(milliseconds=20),
    )


def test_three_requests_per_trial_with_params_metrics_and_tags() -> None:
    client = FakeClient()
    rec = TrialRecorder(client, "7", "parent", {"host": "h", "pid": "1"}, threads=3)
    for n in range(20):
        rec.note(n, {"val_rmse": 0.8, "val_mae": 0.6, "val_r2": 0.2})
        rec(None, frozen(n, "FAIL" if n == 5 else "COMPLETE"))
    assert rec.close() == 20
    kinds = [c[0] for c in client.calls]
    assert kinds.count("create") == kinds.count("batch") == kinds.count("end") == 20
    creates = [c[1] for c in client.calls if c[0] == "create"]
    assert {t["optuna.trial"] for _, t, _ in creates} == {str(n) for n in range(20)}
    assert all(t["mlflow.parentRunId"] == "parent" and t["host"] == "h" for _, t, _ in creates)
    batch = next(c[1] for c in client.calls if c[0] == "batch")
    assert {m.key for m in batch[1]} == {"val_rmse", "val_mae", "val_r2"}
    assert {p.key for p in batch[2]} == {"alpha", "l1_ratio"}
    ends = dict(c[1] for c in client.calls if c[0] == "end")
    assert ends[rec.run_id(5)] == "FAILED"
    assert list(ends.values()).count("FINISHED") == 19


def test_failed_trial_is_retried_without_a_second_run() -> None:
    client = FakeClient(fail_log_batch=1)
    rec = TrialRecorder(client, "7", "p", {}, threads=1)
    rec.note(0, {"val_rmse": 0.8})
    rec(None, frozen(0))
    assert rec.close() == 1
    assert client.runs == 1  # the run created before the failure is reused
    assert [c[0] for c in client.calls] == ["create", "batch", "end"]


def test_persistent_failure_raises() -> None:
    client = FakeClient(fail_log_batch=10)
    rec = TrialRecorder(client, "7", "p", {}, threads=2)
    for n in range(3):
        rec(None, frozen(n))
    with pytest.raises(RecordingError, match="3 of 3 trials have no MLflow run"):
        rec.close()
