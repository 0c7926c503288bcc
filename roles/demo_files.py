"""Role `demo_files`: the demo code, the checksum-verified wine data, setenv.sh and a README."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.runner import Role
from mlflow_stack.engine.steps import (
    Directory,
    File,
    Run,
    Service,
    Step,
    StepError,
    SystemUser,
    q,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.engine.trees import tree_steps
from roles import jupyter, mysql

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "demo_wine"
ROOT = jupyter.ROOT_DIR
USER = jupyter.USER
DATA_DIR = f"{ROOT}/data"
DATA_PATH = jupyter.DATA_PATH
WARM_UNIT = "demo-wine-warm.service"
WARM_SOCKET = "/run/demo-wine/warm.sock"


def download_script(url: str, sha256: str, path: str, owner: str) -> str:
    """Fetch `url` next to `path`, verify it, then move it into place (old file kept on error)."""
    return (
        f'set -e; tmp=$(mktemp "$(dirname {q(path)})/.download.XXXXXX"); '
        "trap 'rm -f \"$tmp\"' EXIT; "
        f'curl -fsSL --retry 3 -o "$tmp" {q(url)}; '
        'got=$(sha256sum "$tmp" | cut -d" " -f1); '
        f'if [ "$got" != {sha256} ]; then echo "checksum mismatch for {url}: '
        f'got $got, expected {sha256}; the old file is kept" >&2; exit 1; fi; '
        f'chown {q(owner)}:{q(owner)} "$tmp"; chmod 644 "$tmp"; mv -f "$tmp" {q(path)}; '
        "trap - EXIT"
    )


def data_steps(ctx: RoleContext) -> list[Step]:
    dv = ctx.vars.demo
    if dv.data_file:
        local = Path(dv.data_file).expanduser()
        try:
            data = local.read_bytes()
        except OSError as exc:
            raise StepError(f"demo.data_file {local}: {exc.strerror}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != dv.data_sha256:
            raise StepError(
                f"demo.data_file {local}: checksum mismatch (sha256 {got}, expected "
                f"{dv.data_sha256}); use the original file or set demo.data_sha256"
            )
        return [File(DATA_PATH, data, USER, USER, 0o644, label="data (uploaded)")]
    state = F.PathState(DATA_PATH)
    return [
        Run(
            "data (downloaded, sha256 verified)",
            download_script(dv.data_url, dv.data_sha256, DATA_PATH, USER),
            when=lambda c: c[state] is None or c[state].sha256 != dv.data_sha256,
            needs=(state,),
            timeout=300,
        )
    ]


def build(ctx: RoleContext) -> list[Step]:
    if not DEMO_SOURCE.is_dir():
        raise StepError(f"{DEMO_SOURCE} is missing: the demo code ships with mlflow-stack")
    v = ctx.vars
    env_prefix = f"{v.python.prefix}/envs/demo"
    tracking_uri = f"http://127.0.0.1:{v.mlflow.port}"
    readme = render(
        "demo/README.j2",
        host=ctx.host,
        mlflow_port=v.mlflow.port,
        jupyter_port=v.jupyter.port,
        user=USER,
        root=ROOT,
        data_sha256=v.demo.data_sha256,
        python_prefix=v.python.prefix,
        db=f"{mysql.flavor(ctx.os).package} on 127.0.0.1:{v.mysql.port} (databases mlflow, optuna)"
        if v.mlflow.backend == "mysql"
        else "SQLite, /opt/mlflow/mlflow.db",
    )
    setenv = render(
        "demo/setenv.sh.j2", tracking_uri=tracking_uri, data_path=DATA_PATH, env_prefix=env_prefix
    )
    warm = v.demo.warm_runner
    return [
        SystemUser(USER, home=ROOT, shell="/bin/bash"),
        Directory(ROOT, USER, USER, 0o755),
        Directory(DATA_DIR, USER, USER, 0o755),
        *tree_steps(DEMO_SOURCE, f"{ROOT}/demo_wine", USER, USER, (WARM_UNIT,) if warm else ()),
        *data_steps(ctx),
        File(f"{ROOT}/setenv.sh", setenv, USER, USER, 0o644),
        File(f"{ROOT}/README", readme, USER, USER, 0o644),
        *warm_runner_steps(env_prefix, warm),
    ]


def warm_runner_steps(env_prefix: str, enabled: bool) -> list[Step]:
    """The warm runner's unit, enabled and running (stopped and disabled when turned off)."""
    unit = render(
        "systemd/demo-wine-warm.service.j2",
        user=USER,
        root_dir=ROOT,
        env_prefix=env_prefix,
        socket=WARM_SOCKET,
    )
    notify = (WARM_UNIT,) if enabled else ()
    return [
        File(f"/etc/systemd/system/{WARM_UNIT}", unit, notify=notify, unit_file=True),
        Service(WARM_UNIT, enabled=enabled, running=enabled),
    ]


role = Role("demo_files", build)
