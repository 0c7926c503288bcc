"""OutageGuard with real Optuna studies: trials cut off by a storage outage are failed,
recorded and run again; other errors still stop the search."""

from __future__ import annotations

import optuna
import pytest
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState

from demo_wine.outages import OutageGuard, is_outage

optuna.logging.set_verbosity(optuna.logging.ERROR)


class Recorded(list):
    def __call__(self, study, trial):
        self.append((trial.number, trial.state))


def test_an_outage_inside_a_trial_fails_it_records_it_and_runs_another():
    study = optuna.create_study()
    recorded = Recorded()
    guard = OutageGuard(study, recorded, patience_s=5)
    broken = {3, 7}

    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        if trial.number in broken:
            raise StorageInternalError("An exception is raised during the commit.")
        return x * x

    guard.optimize(objective, n_trials=10)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 10 and states.count(TrialState.FAIL) == 2
    assert sorted(n for n, _ in recorded) == list(range(12))  # every finished trial, once
    assert guard.outages == 2 and guard.cut_off == [3, 7]


def test_an_outage_between_a_trials_creation_and_its_objective_leaves_nothing_running():
    """The sampler reads the study after the trial exists: an outage there cuts it off too."""

    class FlakySampler(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            super().before_trial(study, trial)
            if trial.number == 4:
                raise StorageInternalError("Lost connection to MySQL server during query")

    study = optuna.create_study(sampler=FlakySampler(seed=1))
    recorded = Recorded()
    guard = OutageGuard(study, recorded, patience_s=5)
    guard.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=6)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) == 6 and states[4] == TrialState.FAIL
    assert sorted(n for n, _ in recorded) == list(range(7)) and guard.cut_off == [4]
    assert "create_new_trial" not in vars(study._storage)  # the storage is left as it was


def test_a_trial_whose_creation_lost_its_answer_is_found_by_its_owner_mark():
    """The INSERT committed, then the connection dropped: the trial exists, unknown to us."""

    class LosesAnswer(optuna.storages.InMemoryStorage):
        def create_new_trial(self, study_id, template_trial=None):
            trial_id = super().create_new_trial(study_id, template_trial)
            if self.get_trial(trial_id).number == 2:
                raise StorageInternalError("Lost connection to MySQL server during query")
            return trial_id

    trial_two_is_cut_off_and_the_strangers_left_running(LosesAnswer())


def trial_two_is_cut_off_and_the_strangers_left_running(storage) -> None:
    """4 trials through the guard on `storage`, whose creation of trial 2 misbehaves, beside
    another worker's running trial: trial 2 failed and recorded, 4 complete, the other
    worker's trial left alone, every trial of ours recorded once."""
    study = optuna.create_study(storage=storage)
    other = optuna.load_study(study_name=study.study_name, storage=study._storage)
    stranger = other.ask()  # another worker's trial, running meanwhile: not ours to fail
    recorded = Recorded()
    guard = OutageGuard(study, recorded, patience_s=5)
    guard.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=4)
    states = {t.number: t.state for t in study.trials}
    assert states[stranger.number] == TrialState.RUNNING
    assert [n for n, s in states.items() if s == TrialState.RUNNING] == [stranger.number]
    assert states[2] == TrialState.FAIL and guard.cut_off == [2]
    assert list(states.values()).count(TrialState.COMPLETE) == 4
    assert sorted(n for n, _ in recorded) == [n for n in states if n != stranger.number]


def test_a_creation_the_storage_retried_leaves_no_trial_of_ours_running():
    """Optuna's RDB storage retries a trial's creation itself when the commit's answer is
    lost: the first trial exists (committed, ours) while the retry's trial is the one run, and
    no outage ever reaches the guard. Seen in the e2e database restart: one trial left
    RUNNING. The guard's last sweep finds it by its owner mark."""

    class RetriesAfterLostAnswer(optuna.storages.InMemoryStorage):
        def create_new_trial(self, study_id, template_trial=None):
            trial_id = super().create_new_trial(study_id, template_trial)
            if self.get_trial(trial_id).number == 2:  # committed, answer lost: try again
                trial_id = super().create_new_trial(study_id, template_trial)
            return trial_id

    trial_two_is_cut_off_and_the_strangers_left_running(RetriesAfterLostAnswer())


def test_other_errors_stop_the_search():
    study = optuna.create_study()
    guard = OutageGuard(study, Recorded())

    def objective(trial):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        guard.optimize(objective, n_trials=3)
    assert guard.outages == 0


def test_outage_detection_follows_the_cause_chain():
    from sqlalchemy.exc import OperationalError

    lost = OperationalError("SELECT 1", {}, Exception("Lost connection to MySQL server"))
    try:
        try:
            raise lost
        except OperationalError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert is_outage(wrapped)
    assert not is_outage(ValueError("bad input"))
