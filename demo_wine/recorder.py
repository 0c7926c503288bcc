"""Record every finished Optuna trial as its own MLflow child run, cheaply and off-thread.

Per trial, exactly three requests whatever the number of runs already stored:
``create_run`` (tags, incl. ``mlflow.parentRunId``), one ``log_batch`` (params + metrics) and
``set_terminated``. No model, no per-value calls, no searches. The optimizer thread only
enqueues; a small thread pool talks to the server so HTTP latency (and the ~40 ms keep-alive
stall of a multi-worker uvicorn server) overlaps with optimisation. :meth:`close` waits until
every enqueued trial has its run, retrying failed ones once, and raises if any is still missing.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# set_terminated() otherwise does an extra get_run per call just to print the run's URL.
_SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


class RecordingError(RuntimeError):
    """Some finished trials could not be recorded as MLflow runs."""


@dataclass
class TrialRecord:
    number: int
    state: str
    params: dict[str, Any]
    metrics: dict[str, float]
    start_ms: int
    end_ms: int
    run_id: str | None = None
    error: str | None = field(default=None, repr=False)


class TrialRecorder:
    """Optuna callback: ``study.optimize(..., callbacks=[recorder])``, then :meth:`close`."""

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        parent_run_id: str,
        tags: dict[str, str],
        *,
        threads: int = 4,
        max_pending: int = 10_000,
    ) -> None:
        os.environ.setdefault(_SUPPRESS_URL, "true")
        self._client = client
        self._experiment_id = experiment_id
        self._parent = parent_run_id
        self._tags = {**tags, "mlflow.parentRunId": parent_run_id}
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="trials")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._metrics: dict[int, dict[str, float]] = {}
        self._pending: list[tuple[TrialRecord, Future[None]]] = []
        self.records: dict[int, TrialRecord] = {}

    def note(self, number: int, metrics: dict[str, float]) -> None:
        """Attach metrics to trial ``number`` (called from the objective)."""
        with self._lock:
            self._metrics[number] = metrics

    def __call__(self, study: Any, trial: Any) -> None:
        """Optuna callback: enqueue the finished ``trial`` (a FrozenTrial)."""
        with self._lock:
            metrics = self._metrics.pop(trial.number, {})
        end = trial.datetime_complete or trial.datetime_start
        record = TrialRecord(
            number=trial.number,
            state=trial.state.name,
            params=dict(trial.params),
            metrics=metrics,
            start_ms=_ms(trial.datetime_start),
            end_ms=_ms(end),
        )
        self.submit(record)

    def submit(self, record: TrialRecord) -> None:
        self._slots.acquire()
        with self._lock:
            self.records[record.number] = record
            self._pending.append((record, self._pool.submit(self._record_released, record)))

    def _record_released(self, record: TrialRecord) -> None:
        try:
            self._record(record)
        finally:
            self._slots.release()

    def _record(self, rec: TrialRecord) -> None:
        from mlflow.entities import Metric, Param

        client = self._client
        if rec.run_id is None:
            tags = {**self._tags, "optuna.trial": str(rec.number), "optuna.state": rec.state}
            run = client.create_run(
                self._experiment_id,
                start_time=rec.start_ms,
                tags=tags,
                run_name=f"trial-{rec.number:05d}",
            )
            rec.run_id = run.info.run_id
        client.log_batch(
            rec.run_id,
            metrics=[Metric(k, float(v), rec.end_ms, 0) for k, v in rec.metrics.items()],
            params=[
                Param(k, repr(v) if isinstance(v, float) else str(v)) for k, v in rec.params.items()
            ],
        )
        status = "FINISHED" if rec.state == "COMPLETE" else "FAILED"
        client.set_terminated(rec.run_id, status=status, end_time=rec.end_ms)
        rec.error = None

    def close(self) -> int:
        """Wait for every trial's run; retry failures once; return the number recorded."""
        with self._lock:
            pending, self._pending = self._pending, []
        failed = []
        for record, future in pending:
            try:
                future.result()
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                failed.append(record)
        self._pool.shutdown(wait=True)
        still = []
        for record in failed:
            try:
                self._record(record)
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                still.append(record)
        if still:
            first = str(still[0].error).splitlines()[0]
            raise RecordingError(
                f"{len(still)} of {len(self.records)} trials have no MLflow run "
                f"(first: trial {still[0].number}: {first})"
            )
        return len(self.records)

    def run_id(self, number: int) -> str | None:
        record = self.records.get(number)
        return record.run_id if record else None


def _ms(moment: Any) -> int:
    return int(moment.timestamp() * 1000) if moment else int(time.time() * 1000)
