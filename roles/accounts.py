"""The service accounts and their areas, shared by the roles that need them (not a role).

An account gets a nologin shell and a root-owned passwd home (no SSH key can be planted there),
and one writable state directory; the code and configuration it runs are root's. Hosts set up
by an earlier version had the accounts own their code trees (`/opt/mlflow`, `/opt/demo`): their
data moves to the new areas, as the account itself, before root takes the trees over.
"""

from __future__ import annotations

from mlflow_stack import layout
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import Directory, Run, Step, SystemUser, q


def take_over(path: str, account: str, script: str, units: tuple[str, ...], label: str) -> Run:
    """When `account` owns `path` (the older layout): stop `units`, run `script` as the
    account (it moves its data out), then give `path` to root."""
    fact = F.PathState(path)
    stop = f"systemctl stop {' '.join(units)} 2>/dev/null; " if units else ""
    return Run(
        label,
        f"{stop}runuser -u {account} -- sh -c {q(script)} && "
        f"chown -h root:root {q(path)} && chmod 755 {q(path)}",
        when=lambda c: c[fact] is not None and c[fact].owner == account,
        needs=(fact,),
        notify=units,
    )


def mlflow_account() -> list[Step]:
    """The tracking server's account: state in /var/lib/mlflow, code in root's /opt/mlflow."""
    user, state = layout.MLFLOW_USER, layout.MLFLOW_STATE
    moves = (
        f"set -e; cd {layout.MLFLOW_HOME}; for f in artifacts mlflow.db basic_auth.db; do "
        f'if [ -e "$f" ] || [ -L "$f" ]; then if [ -e {state}/"$f" ]; then '
        f'echo "both {layout.MLFLOW_HOME}/$f and {state}/$f exist: keep one, then rerun" >&2; '
        f'exit 1; fi; mv "$f" {state}/; fi; done; rm -rf .cache'
    )
    return [
        SystemUser(user, home=layout.MLFLOW_HOME, shell=layout.NOLOGIN),
        Directory(state, user, user, 0o750),
        take_over(
            layout.MLFLOW_HOME,
            user,
            moves,
            (layout.MLFLOW_UNIT,),
            f"{layout.MLFLOW_HOME} to root (its data to {state})",
        ),
        Directory(layout.MLFLOW_HOME, "root", "root", 0o755),
    ]


def demo_account(warm_runner: bool) -> list[Step]:
    """The demo account (Jupyter, runs, served models): its workspace in /var/lib/demo, the
    demo code in root's /opt/demo. `warm_runner`: whether that unit runs (it is restarted
    after a take-over only then)."""
    user, workspace = layout.DEMO_USER, layout.DEMO_WORKSPACE
    kept = f"{workspace}/previous-opt-demo"
    moves = (
        f"set -e; mkdir -p {workspace} {kept}; cd {layout.DEMO_ROOT}; "
        "if [ -d demo_wine/notebooks ]; then mv demo_wine/notebooks "
        f"{kept}/shipped-notebooks-as-edited; fi; rm -rf demo_wine data setenv.sh README .cache; "
        f'for f in * .[!.]*; do if [ -e "$f" ] || [ -L "$f" ]; then mv "$f" {kept}/; fi; done'
    )
    return [
        SystemUser(user, home=layout.DEMO_ROOT, shell=layout.NOLOGIN),
        Directory(layout.DEMO_STATE, user, user, 0o750),
        take_over(
            layout.DEMO_ROOT,
            user,
            moves,
            (layout.JUPYTER_UNIT, *((layout.WARM_UNIT,) if warm_runner else ())),
            f"{layout.DEMO_ROOT} to root (its files to {kept})",
        ),
        Directory(layout.DEMO_ROOT, "root", "root", 0o755),
    ]
