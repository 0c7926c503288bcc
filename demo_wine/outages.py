"""Tuning through an outage of the study's database (a MySQL/MariaDB restart, a failover).

Optuna gives up at the first storage error. :class:`OutageGuard` runs ``study.optimize`` so that
an outage only pauses the search: it waits until the storage answers again, marks the trials
it cut off as failed (so none is left ``RUNNING``), hands them to the recorder (every finished
trial keeps its MLflow run), then runs trials again until this process has its
``n_trials`` — trials cut off by the outage do not count, other failures do (as in Optuna).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from demo_wine.errors import InputError

DEFAULT_PATIENCE_S = 180.0
OWNER_ATTR = "demo_wine:owner"  # system attribute: the process that created a trial


def is_outage(exc: BaseException) -> bool:
    """True if `exc` (or its cause) says the database is unreachable or the connection broke."""
    from optuna.exceptions import StorageInternalError

    try:
        from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
    except ImportError:  # in-memory storage only
        return isinstance(exc, StorageInternalError)
    seen: BaseException | None = exc
    for _ in range(10):  # the chain of causes, bounded
        if seen is None:
            return False
        if isinstance(seen, StorageInternalError | OperationalError | InterfaceError):
            return True
        if isinstance(seen, DisconnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class OutageGuard:
    """Run ``n_trials`` trials of ``study`` in this process, surviving storage outages."""

    def __init__(
        self, study: Any, recorder: Callable[[Any, Any], None], *, patience_s: float | None = None
    ) -> None:
        self._study = study
        self._recorder = recorder
        self._patience_s = DEFAULT_PATIENCE_S if patience_s is None else patience_s
        self._lock = threading.Lock()
        self._created: set[int] = set()  # ids of the trials this process created
        self._token = uuid.uuid4().hex  # written into each trial at its creation
        self._finished: set[int] = set()  # ids of those handed to the recorder
        self.cut_off: list[int] = []  # trial numbers failed because of an outage
        self.outages = 0

    def optimize(self, objective: Callable[[Any], float], n_trials: int, jobs: int = 1) -> None:
        storage = self._study._storage
        create = storage.create_new_trial

        def create_tracked(study_id: int, template_trial: Any = None) -> int:
            # An outage can cut a trial off after its creation and before its objective runs
            # (Optuna reads the study for the sampler in between): remember every trial we own.
            # The owner mark is written in the creating transaction, so a trial whose creation
            # committed but whose answer was lost with the connection is found as ours too.
            trial_id = create(study_id, template_trial or self._owned_template())
            with self._lock:
                self._created.add(trial_id)
            return trial_id

        storage.create_new_trial = create_tracked
        try:
            self._optimize(objective, n_trials, jobs)
        finally:
            del storage.create_new_trial  # back to the class's method

    def _optimize(self, objective: Callable[[Any], float], n_trials: int, jobs: int) -> None:
        while True:
            with self._lock:
                remaining = n_trials - (len(self._finished) - len(self.cut_off))
            try:
                if remaining <= 0:
                    # A creation the storage retried by itself (its first commit's answer
                    # lost) left a trial of ours no outage reported: fail it (one query).
                    self._fail_cut_off_trials()
                    return
                self._study.optimize(
                    objective,
                    n_trials=remaining,
                    n_jobs=jobs,
                    callbacks=[self._record],
                    gc_after_trial=False,
                )
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.outages += 1
                self._wait_for_storage(exc)
                self._fail_cut_off_trials()

    def _owned_template(self) -> Any:
        from optuna.trial import FrozenTrial, TrialState

        return FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={OWNER_ATTR: self._token},
            intermediate_values={},
            trial_id=-1,
        )

    def _record(self, study: Any, trial: Any) -> None:
        with self._lock:
            self._finished.add(trial._trial_id)
        self._recorder(study, trial)

    def _wait_for_storage(self, first: BaseException) -> None:
        storage, name = self._study._storage, self._study.study_name
        deadline = time.monotonic() + self._patience_s
        while True:
            try:
                storage.get_study_id_from_name(name)
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if time.monotonic() > deadline:
                    reason = str(first).strip().splitlines()[0] if str(first).strip() else ""
                    raise InputError(
                        f"the Optuna database stayed unreachable for {self._patience_s:.0f} s "
                        f"({reason or type(first).__name__}): check the database server"
                    ) from None
            time.sleep(1.0)

    def _fail_cut_off_trials(self) -> None:
        """Mark our trials left RUNNING as failed and record every one that finished."""
        from optuna.trial import TrialState

        storage = self._study._storage
        running = storage.get_all_trials(
            self._study._study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        marked = {t._trial_id for t in running if t.system_attrs.get(OWNER_ATTR) == self._token}
        with self._lock:
            open_ids = sorted((self._created | marked) - self._finished)
        for trial_id in open_ids:
            trial = storage.get_trial(trial_id)
            if trial.state == TrialState.RUNNING:
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                trial = storage.get_trial(trial_id)
            if trial.state != TrialState.COMPLETE:
                with self._lock:
                    self.cut_off.append(trial.number)
            self._record(self._study, trial)
