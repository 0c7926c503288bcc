"""Safe MLflow upgrades, gc and the admin password as plans (no host): a changed mlflow env is
built beside the serving one and switched to by `stackdata.py upgrade` only after a backup and
a migration; gc runs on a timer as the mlflow account; the variables that drive them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_stack import env_requirements, layout, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import Apt, PlanContext, Schedule, Service, StepError
from roles import anaconda, mlflow_server
from tests.unit.test_roles import context, find

OLD = Path(__file__).resolve().parents[1] / "e2e" / "requirements" / "mlflow-2.22.5.txt"
TEXT = env_requirements.requirements("mlflow")
CURRENT = F.ShellResult(0, env_requirements.digest(TEXT) + "\n")
STALE = F.ShellResult(0, "0" * 64 + "\n")
NONE = F.ShellResult(1, "")
ENV_INFO = F.PathInfo("file", 0o644, "root", "root", 10)
DIR_INFO = F.PathInfo("directory", 0o755, "root", "root", 0)


def env_steps(**vars):
    steps = anaconda.build(context(**vars))
    return (
        find(steps, "env mlflow"),
        find(steps, "env mlflow (new, beside the serving one)"),
        find(steps, "env mlflow.next removed (the serving env is the wanted one)"),
    )


def facts(step, stamp, exists=None, beside=NONE, leftover=None) -> PlanContext:
    values = {}
    for fact in step.needs:
        if fact.key.startswith("env-stamp:") and fact.key.endswith(".next"):
            values[fact.key] = beside
        elif fact.key.startswith("env-stamp:"):
            values[fact.key] = stamp
        elif fact.key.endswith("pyvenv.cfg"):
            values[fact.key] = exists
        else:
            values[fact.key] = leftover
    return PlanContext(values)


def test_a_first_mlflow_env_is_synced_in_place():
    in_place, beside, _ = env_steps()
    assert in_place.plan(facts(in_place, NONE)) is not None
    assert beside.plan(facts(beside, NONE)) is None
    assert in_place.notify == (layout.MLFLOW_UNIT,)


def test_a_changed_mlflow_env_is_built_beside_the_serving_one_relocatable():
    in_place, beside, _ = env_steps()
    assert in_place.plan(facts(in_place, STALE, ENV_INFO)) is None  # the server keeps its env
    change = beside.plan(facts(beside, STALE, ENV_INFO))
    script = change.commands[0].script
    assert "uv venv -q --relocatable" in script and "/opt/anaconda/envs/mlflow.next" in script
    assert "uv pip sync -q --require-hashes" in script
    assert beside.notify == () and beside.id == anaconda.NEXT_ENV_ID  # no restart: not yet
    # built already (a failed migration left it): not again
    assert beside.plan(facts(beside, STALE, ENV_INFO, beside=CURRENT)) is None
    assert in_place.plan(facts(in_place, CURRENT, ENV_INFO)) is None


def test_a_leftover_next_env_goes_once_the_serving_env_is_the_wanted_one():
    *_, leftover = env_steps()
    assert "rm -rf /opt/anaconda/envs/mlflow.next" in (
        leftover.plan(facts(leftover, CURRENT, leftover=DIR_INFO)).commands[0].script
    )
    assert leftover.plan(facts(leftover, CURRENT, leftover=None)) is None
    assert leftover.plan(facts(leftover, STALE, leftover=DIR_INFO)) is None


def test_requirements_from_a_file_named_in_the_inventory(tmp_path):
    ctx = context(python={"requirements": {"mlflow": str(OLD)}})
    assert anaconda.requirements_for(ctx, "mlflow") == OLD.read_text()
    assert anaconda.mlflow_version(OLD.read_text()) == "2.22.5"
    assert anaconda.mlflow_version(TEXT) == mlflow_server.PINNED
    assert anaconda.requirements_for(ctx, "demo") == env_requirements.requirements("demo")
    missing = context(python={"requirements": {"mlflow": str(tmp_path / "nope.txt")}})
    with pytest.raises(StepError, match=r"python\.requirements\.mlflow: cannot read .*nope\.txt"):
        anaconda.build(missing)


def unit_of(steps) -> str:
    return find(steps, f"file /etc/systemd/system/{layout.MLFLOW_UNIT}").content


def test_another_mlflow_than_the_pin_runs_as_mlflow_server_without_the_snapshot():
    old = mlflow_server.build(context(python={"requirements": {"mlflow": str(OLD)}}))
    assert "/bin/python -m mlflow server --host 127.0.0.1 --port 5000" in unit_of(old)
    assert not any(s.label.startswith("tracking schema ") for s in old)
    pinned = mlflow_server.build(context())
    assert f"/bin/python {layout.MLFLOW_LAUNCHER} --host" in unit_of(pinned)
    assert any(s.label.startswith("tracking schema ") for s in pinned)


def upgrade_step(steps):
    return find(steps, "MLflow schema and env: back up, migrate, switch")


def test_the_upgrade_switches_to_the_env_built_beside_only_through_stackdata():
    steps = mlflow_server.build(context())
    step = upgrade_step(steps)
    schema, ready = step.needs
    head = F.ShellResult(0, mlflow_server.SCHEMA_HEAD + "\n")
    # the env was built beside in this run, or by an earlier one whose migration failed
    for ctx in (
        PlanContext({schema.key: head, ready.key: NONE}, changed={anaconda.NEXT_ENV_ID}),
        PlanContext({schema.key: head, ready.key: CURRENT}),
    ):
        script = step.plan(ctx).commands[0].script
        assert script.startswith(
            f"cd / && /opt/anaconda/envs/mlflow/bin/python -I {layout.STACKDATA}"
        )
        assert "upgrade --env /opt/anaconda/envs/mlflow" in script
        assert "--next /opt/anaconda/envs/mlflow.next" in script
    assert step.plan(PlanContext({schema.key: head, ready.key: STALE})) is None
    older = step.plan(
        PlanContext({schema.key: F.ShellResult(0, "0584bdc529eb\n"), ready.key: NONE})
    )
    assert "--next" not in older.commands[0].script  # the serving env's MLflow is newer
    assert step.user is None  # root: it runs the accounts' parts as the accounts
    assert set(step.notify) == {layout.MLFLOW_UNIT, layout.RECORDER_SOCKET_UNIT, layout.GC_TIMER}
    zstd = next(s for s in steps if isinstance(s, Apt) and s.packages == ("zstd",))
    assert step.waits_for == (zstd.id,)
    assert zstd.schedule is Schedule.BACKGROUND and zstd.exclusive == ""  # MariaDB installs early
    names = [s.label for s in steps]
    assert names.index(f"file {layout.STACKDATA}") < names.index(step.label)
    assert names.index(step.label) < names.index(f"file /etc/systemd/system/{layout.MLFLOW_UNIT}")


def test_an_old_pin_uses_its_own_schema_head():
    step = upgrade_step(mlflow_server.build(context(python={"requirements": {"mlflow": str(OLD)}})))
    schema, ready = step.needs
    at_its_head = PlanContext({schema.key: F.ShellResult(0, "0584bdc529eb\n"), ready.key: NONE})
    assert step.plan(at_its_head) is None


def test_gc_runs_on_a_timer_as_the_mlflow_account():
    steps = mlflow_server.build(context(gc={"older_than": "7d", "on_calendar": "*-*-* 03:00"}))
    service = find(steps, f"file /etc/systemd/system/{layout.GC_UNIT}").content
    timer = find(steps, f"file /etc/systemd/system/{layout.GC_TIMER}").content
    assert "User=mlflow" in service and "Type=oneshot" in service
    assert f"{layout.STACKDATA} gc --older-than 7d --tracking-uri http://127.0.0.1:5000" in service
    assert "EnvironmentFile=/etc/mlflow/mlflow.env" in service and "LoadCredential" not in service
    assert "IPAddressDeny=any\nIPAddressAllow=localhost" in service
    assert "OnCalendar=*-*-* 03:00" in timer and "Persistent=true" in timer
    on = find(steps, f"service {layout.GC_TIMER}")
    assert isinstance(on, Service) and on.enabled and on.running
    off = find(mlflow_server.build(context(gc={"older_than": ""})), f"service {layout.GC_TIMER}")
    assert not off.enabled and not off.running
    public = mlflow_server.build(context(mlflow={"public": True}))
    service = find(public, f"file /etc/systemd/system/{layout.GC_UNIT}").content
    # the admin's password reaches gc as a credential of the unit, never on a command line
    assert "LoadCredential=admin_password:/etc/mlflow-stack/secrets/mlflow_admin_password" in (
        service
    )


def test_public_mode_keeps_the_auth_dbs_admin_password_the_secrets():
    """Set straight in the database only with MLflow restarted after (its auth app caches
    good credentials: an old password would stay valid), and before the accounts step,
    which rotates through the API."""
    steps = mlflow_server.build(context(mlflow={"public": True}))
    step = find(steps, "MLflow admin password is the secret's")
    assert step.notify == (layout.MLFLOW_UNIT,)
    accounts = next(s for s in steps if s.label.startswith("MLflow accounts"))
    assert steps.index(step) < steps.index(accounts) and accounts.flush_before
    (state,) = step.needs
    assert "auth-admin --check" in state.command() and step.user is None

    def plans(rc, out, changed=()):
        return step.plan(PlanContext({state.key: F.ShellResult(rc, out)}, changed=set(changed)))

    assert plans(0, "differs\n") is not None and "auth-admin --set" in (
        plans(0, "differs\n").commands[0].script
    )
    assert plans(0, "ok\n") is None and plans(0, "absent\n") is None
    assert plans(2, "") is None  # the program not there yet (first converge): nothing to fix
    secret = f"file:{layout.secret_path('mlflow_admin_password')}"
    assert plans(0, "ok\n", [secret]) is not None  # a new secret: the database follows it


@pytest.mark.parametrize(
    ("vars", "error"),
    [
        ({"gc": {"older_than": "30 days"}}, "gc.older_than"),
        ({"gc": {"on_calendar": "daily\nExecStartPre=/bin/sh"}}, "gc.on_calendar"),
        ({"disk": {"warn_free_below": "plenty"}}, "disk.warn_free_below"),
        ({"backup": {"before_upgrade": "never"}}, "backup.before_upgrade"),
        ({"python": {"requirements": {"other": "x.txt"}}}, "python.requirements"),
    ],
)
def test_bad_values_are_refused(vars, error):
    from pydantic import ValidationError

    from mlflow_stack.vars import validate

    with pytest.raises(ValidationError, match=error.replace(".", r"\.")):
        validate(vars)


class Recorded:
    """A host that answers the stamp command with `stamp` (rc 1: no env)."""

    def __init__(self, rc: int, stamp: str) -> None:
        self.rc, self.stamp, self.scripts = rc, stamp, []

    def run(self, script, **kwargs):
        from mlflow_stack.engine.host import RunResult

        self.scripts.append(script)
        return RunResult(self.rc, self.stamp, "", 0.0)


def test_a_controller_backup_is_taken_only_when_the_mlflow_env_would_change():
    from mlflow_stack.actions.backup import pending_upgrade
    from mlflow_stack.vars import defaults

    v = defaults()
    assert pending_upgrade(Recorded(0, "0" * 64 + "\n"), v)
    assert not pending_upgrade(Recorded(0, env_requirements.digest(TEXT) + "\n"), v)
    host = Recorded(1, "")  # a bare host: its first env is no upgrade
    assert not pending_upgrade(host, v)
    assert "/opt/anaconda/envs/mlflow/pyvenv.cfg" in host.scripts[0]


def test_the_facts_of_upgrades_and_the_admin_check_are_rebuilt_from_their_keys():
    """The probe plan keeps keys only: these facts are prefetched like the rest."""
    for fact in (
        anaconda.next_stamp_fact("/opt/anaconda"),
        role_facts.AuthAdmin("/opt/anaconda/envs/mlflow"),
    ):
        assert F.from_key(fact.key) == fact
