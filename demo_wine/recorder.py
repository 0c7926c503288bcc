"""Record every finished Optuna trial as its own MLflow child run, cheaply and off-thread.

Two ways, one interface (``note`` metrics from the objective, pass the recorder to
``study.optimize(callbacks=[...])``, then :meth:`close`):

* :class:`StoreRecorder` writes the trial runs into the MLflow *tracking database*, many
  trials per transaction, from one background thread: through :class:`DatabaseStore`
  (a database this process may write, e.g. the local ``sqlite:///`` store) or
  :class:`ServiceStore` (the record service on the server's host, which alone holds the
  server's database credential; see ``record_service``). Rows are exactly what MLflow's own SQL
  store writes for ``create_run`` + ``log_batch`` + ``set_terminated`` (a test compares them);
  the schema must be at the installed MLflow's head and the parent run must already be in that
  database, else it refuses. Run ids derive from the parent run and the trial number, so a
  batch written twice (a retry after a lost commit acknowledgement) never duplicates a run.
* :class:`TrialRecorder` sends exactly three requests per trial to the tracking server
  (``create_run``, one ``log_batch``, ``set_terminated``) from a thread pool, for workers that
  cannot reach the database.

:meth:`close` waits until every enqueued trial has its run, retrying failed ones once, and
raises :class:`RecordingError` if any is still missing.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from demo_wine.outages import DEFAULT_PATIENCE_S

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


class _Recorder:
    """What both recorders share: metrics noted by the objective, the Optuna callback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[int, dict[str, float]] = {}
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
        raise NotImplementedError

    def run_id(self, number: int) -> str | None:
        record = self.records.get(number)
        return record.run_id if record else None


class TrialRecorder(_Recorder):
    """Through the tracking server: three requests per trial from a thread pool."""

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
        super().__init__()
        os.environ.setdefault(_SUPPRESS_URL, "true")
        self._client = client
        self._experiment_id = experiment_id
        self._parent = parent_run_id
        self._tags = {**tags, "mlflow.parentRunId": parent_run_id}
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="trials")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending: list[tuple[TrialRecord, Future[None]]] = []

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
        _raise_if_missing(still, len(self.records))
        return len(self.records)


class StoreMismatch(RuntimeError):
    """The database is not usable as this MLflow's tracking store (schema, parent run)."""


_RUN_NAMESPACE = uuid.UUID("6f0d7a52-3c7e-4d2b-9a51-2b8d6d1f4e11")


def trial_run_id(parent_run_id: str, number: int) -> str:
    """The MLflow run id of trial ``number`` under ``parent_run_id`` (deterministic, so a
    batch written twice cannot create a second run for the same trial)."""
    return uuid.uuid5(_RUN_NAMESPACE, f"{parent_run_id}/{number}").hex


class StoreRecorder(_Recorder):
    """Into the MLflow tracking database, many trials per write, through a `TrialStore`:
    `DatabaseStore` (straight into a database we may write) or `ServiceStore` (the record
    service on the server's host, which holds the database's credential).

    One background thread writes whatever has accumulated every ``interval`` seconds (at most
    ``max_batch`` trials per write), retrying for up to ``patience_s``.
    """

    def __init__(
        self,
        store: TrialStore,
        *,
        interval: float = 0.2,
        max_batch: int = 500,
        patience_s: float = DEFAULT_PATIENCE_S,
    ) -> None:
        super().__init__()
        self._store = store
        self._interval = interval
        self._max_batch = max_batch
        self._patience_s = patience_s
        self._queue: list[TrialRecord] = []
        self._failed: list[TrialRecord] = []
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="trial-store", daemon=True)
        self._thread.start()

    def submit(self, record: TrialRecord) -> None:
        record.run_id = trial_run_id(self._store.parent_run_id, record.number)
        with self._lock:
            self.records[record.number] = record
            self._queue.append(record)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._closing:
                    self._wake.wait(self._interval)  # let trials accumulate into one batch
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                closing = self._closing
            if batch:
                self._write_with_retries(batch)
            elif closing:
                return

    def _write_with_retries(self, batch: list[TrialRecord]) -> None:
        """Write ``batch``, retrying for up to ``patience_s`` (a database restart pauses the
        recording as it pauses the search); then leave it to :meth:`close`."""
        deadline = time.monotonic() + self._patience_s
        pause = 0.2
        while True:
            try:
                self._store.write(batch)
                for rec in batch:
                    rec.error = None
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() + pause > deadline:
                    break
                time.sleep(pause)
                pause = min(2 * pause, 5.0)
        for rec in batch:
            rec.error = error
        with self._lock:
            self._failed.extend(batch)

    def write(self, batch: list[TrialRecord]) -> int:
        """Write ``batch`` now (idempotent); how many runs were new."""
        return self._store.write(batch)

    def close(self) -> int:
        """Write what is queued, wait for the writer, retry failed trials once; the number of
        trials recorded."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        with self._lock:
            failed, self._failed = self._failed, []
        still = []
        for rec in failed:
            try:
                self._store.write([rec])
                rec.error = None
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
                still.append(rec)
        self._store.close()
        _raise_if_missing(still, len(self.records))
        return len(self.records)


class TrialStore(Protocol):
    """Where `StoreRecorder` writes trial runs: under one parent run, idempotently."""

    parent_run_id: str

    def write(self, batch: list[TrialRecord]) -> int: ...

    def close(self) -> None: ...


class DatabaseStore:
    """The tracking database itself: rows exactly as MLflow's SQL store writes them.

    ``store_uri`` is an SQLAlchemy URL of the tracking server's backend store (or the local
    ``sqlite:///`` store); refused (:class:`StoreMismatch`) unless its schema is at the
    installed MLflow's head and it holds the active parent run in ``experiment_id``.
    """

    def __init__(
        self, store_uri: str, experiment_id: str, parent_run_id: str, tags: dict[str, str]
    ) -> None:
        self._engine = _engine(store_uri)
        try:
            self._artifact_root = _check_store(self._engine, experiment_id, parent_run_id)
        except BaseException:
            self._engine.dispose()
            raise
        self.parent_run_id = parent_run_id
        self._experiment_id = int(experiment_id)
        self._tags = {**tags, "mlflow.parentRunId": parent_run_id}

    def write(self, batch: list[TrialRecord]) -> int:
        """Insert the runs of ``batch`` in one transaction, skipping runs that already exist
        (idempotent); return how many were inserted."""
        from sqlalchemy import select

        rows = _Rows(self._artifact_root, self._experiment_id, self._tags)
        for rec in {r.number: r for r in batch}.values():  # a trial handed over twice: one run
            rows.add(replace(rec, run_id=trial_run_id(self.parent_run_id, rec.number)))
        runs = rows.tables["runs"]
        with self._engine.begin() as conn:
            ids = [r["run_uuid"] for r in rows.runs]
            existing = set(
                conn.execute(select(runs.c.run_uuid).where(runs.c.run_uuid.in_(ids))).scalars()
            )
            for name, table_rows in rows.by_table().items():
                fresh = [r for r in table_rows if r["run_uuid"] not in existing]
                if fresh:
                    conn.execute(rows.tables[name].insert(), fresh)
        return len(ids) - len(existing)

    def close(self) -> None:
        self._engine.dispose()


class ServiceStore:
    """The record service on the tracking server's host (`demo_wine.record_service`), over its
    Unix socket: the service holds the database's credential and writes the rows; this
    process never does. One request per batch, one JSON line each way."""

    def __init__(
        self,
        socket_path: str,
        experiment_id: str,
        parent_run_id: str,
        tags: dict[str, str],
        timeout: float = 120.0,
    ) -> None:
        import socket

        self.parent_run_id = parent_run_id
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        try:
            self._sock.connect(socket_path)
            self._file = self._sock.makefile("rwb")
            hello = {"experiment_id": str(experiment_id), "parent_run_id": parent_run_id}
            self._call({"open": {**hello, "tags": tags}})
        except OSError as exc:
            self._sock.close()
            raise StoreMismatch(f"no record service at {socket_path}: {exc}") from None
        except RuntimeError as exc:
            self._sock.close()
            raise StoreMismatch(str(exc)) from None

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        import json

        with self._lock:
            self._file.write(json.dumps(request).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        if not line:
            raise ConnectionError("the record service closed the connection")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"record service: {answer['error']}")
        return answer

    def write(self, batch: list[TrialRecord]) -> int:
        records = [
            {
                "number": r.number,
                "state": r.state,
                "params": r.params,
                "metrics": {k: _json_number(v) for k, v in r.metrics.items()},
                "start_ms": r.start_ms,
                "end_ms": r.end_ms,
            }
            for r in batch
        ]
        return int(self._call({"write": records})["inserted"])

    def close(self) -> None:
        self._sock.close()


def _json_number(value: float) -> float | str:
    """NaN and infinities as strings (JSON has none); the service turns them back."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


class _Rows:
    """The rows MLflow's SQL store writes for one finished run (create + log_batch + end)."""

    def __init__(self, artifact_root: str, experiment_id: int, tags: dict[str, str]) -> None:
        from mlflow.store.tracking.dbmodels.models import (
            SqlLatestMetric,
            SqlMetric,
            SqlParam,
            SqlRun,
            SqlTag,
        )

        self.tables = {
            "runs": SqlRun.__table__,
            "tags": SqlTag.__table__,
            "params": SqlParam.__table__,
            "metrics": SqlMetric.__table__,
            "latest_metrics": SqlLatestMetric.__table__,
        }
        self._root = artifact_root
        self._experiment_id = experiment_id
        self._tags = tags
        self.runs: list[dict[str, Any]] = []
        self.tags: list[dict[str, Any]] = []
        self.params: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.latest: list[dict[str, Any]] = []

    def by_table(self) -> dict[str, list[dict[str, Any]]]:
        # Parents before children: runs first (foreign keys).
        return {
            "runs": self.runs,
            "tags": self.tags,
            "params": self.params,
            "metrics": self.metrics,
            "latest_metrics": self.latest,
        }

    def add(self, rec: TrialRecord) -> None:
        from mlflow.utils.uri import append_to_uri_path

        run_id = rec.run_id
        name = f"trial-{rec.number:05d}"
        self.runs.append(
            {
                "run_uuid": run_id,
                "name": name,
                "source_type": "UNKNOWN",
                "source_name": "",
                "entry_point_name": "",
                "user_id": "unknown",
                "status": "FINISHED" if rec.state == "COMPLETE" else "FAILED",
                "start_time": rec.start_ms,
                "end_time": rec.end_ms,
                "deleted_time": None,
                "source_version": "",
                "lifecycle_stage": "active",
                "artifact_uri": append_to_uri_path(self._root, run_id, "artifacts"),
                "experiment_id": self._experiment_id,
            }
        )
        tags = {
            **self._tags,
            "optuna.trial": str(rec.number),
            "optuna.state": rec.state,
            "mlflow.runName": name,
        }
        self.tags += [{"key": k, "value": str(v), "run_uuid": run_id} for k, v in tags.items()]
        self.params += [
            {"key": k, "value": repr(v) if isinstance(v, float) else str(v), "run_uuid": run_id}
            for k, v in rec.params.items()
        ]
        for key, raw in rec.metrics.items():
            is_nan, value = _sanitize(float(raw))
            row = {
                "key": key,
                "value": value,
                "timestamp": rec.end_ms,
                "step": 0,
                "is_nan": is_nan,
                "run_uuid": run_id,
            }
            self.metrics.append(row)
            self.latest.append(row)


def _sanitize(value: float) -> tuple[bool, float]:
    """As MLflow's SQL store stores metric values: NaN as 0 + flag, infinities clamped."""
    if math.isnan(value):
        return True, 0.0
    if math.isinf(value):
        return False, math.copysign(sys.float_info.max, value)
    return False, value


def _engine(store_uri: str) -> Any:
    import sqlalchemy

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if store_uri.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # the server writes to the same file
    return sqlalchemy.create_engine(store_uri, **kwargs)


def _check_store(engine: Any, experiment_id: str, parent_run_id: str) -> str:
    """Raise :class:`StoreMismatch` unless the database is at this MLflow's schema head and
    holds the (active) parent run in ``experiment_id``; return the experiment's artifact root."""
    from mlflow.store.db.utils import _verify_schema
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun
    from sqlalchemy import select

    try:
        _verify_schema(engine)
        with engine.connect() as conn:
            parent = conn.execute(
                select(SqlRun.experiment_id, SqlRun.lifecycle_stage).where(
                    SqlRun.run_uuid == parent_run_id
                )
            ).first()
            root = conn.execute(
                select(SqlExperiment.artifact_location).where(
                    SqlExperiment.experiment_id == int(experiment_id)
                )
            ).scalar()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise StoreMismatch(f"{type(exc).__name__}: {text[0] if text else ''}") from None
    if parent is None or str(parent[0]) != str(experiment_id) or parent[1] != "active":
        raise StoreMismatch(f"parent run {parent_run_id} is not in this database")
    return root


def _raise_if_missing(still: list[TrialRecord], total: int) -> None:
    if still:
        first = str(still[0].error).splitlines()[0]
        raise RecordingError(
            f"{len(still)} of {total} trials have no MLflow run "
            f"(first: trial {still[0].number}: {first})"
        )


def _ms(moment: Any) -> int:
    return int(moment.timestamp() * 1000) if moment else int(time.time() * 1000)
