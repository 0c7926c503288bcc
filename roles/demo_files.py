"""Role `demo_files`: the demo code with its checksum-verified wine data, setenv.sh, a README
(all root's, read-only to the demo account) and the warm runner that `invoke train` forks its
runs from."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow_stack import layout
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    File,
    PlanContext,
    Run,
    Service,
    Step,
    StepError,
    q,
    root_only,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.engine.trees import tree_steps
from mlflow_stack.layout import (
    DEMO_CODE,
    DEMO_DATA,
    DEMO_ROOT,
    DEMO_USER,
    WARM_SOCKET_UNIT,
    WARM_UNIT,
)
from mlflow_stack.sizing import WARM_IDLE_S
from roles.accounts import demo_account

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "demo_wine"
DATA_IN_TREE = str(Path(DEMO_DATA).relative_to(DEMO_CODE))  # data/winequality-white.csv


def download_script(url: str, sha256: str, path: str, owner: str) -> str:
    """Fetch `url` next to `path`, verify it, then move it into place (old file kept on error)."""
    return (
        f'{root_only(path)}; set -e; tmp=$(mktemp "$(dirname {q(path)})/.download.XXXXXX"); '
        "trap 'rm -f \"$tmp\"' EXIT; "
        f'url={q(url)}; curl -fsSL --retry 3 -o "$tmp" "$url"; '
        'got=$(sha256sum "$tmp" | cut -d" " -f1); '
        f'if [ "$got" != {q(sha256)} ]; then echo "checksum mismatch for $url: '
        f'got $got, expected {sha256}; the old file is kept" >&2; exit 1; fi; '
        f'chown {q(owner)}:{q(owner)} "$tmp"; chmod 644 "$tmp"; mv -f "$tmp" {q(path)}; '
        "trap - EXIT"
    )


def data_steps(ctx: RoleContext) -> list[Step]:
    """The data file: the copy shipped in demo_wine/data, a local file, or a download; each
    checked against `demo.data_sha256` before it replaces the host's."""
    dv = ctx.vars.demo
    if dv.data_url:
        state = F.PathState(DEMO_DATA)
        return [
            Run(
                "data (downloaded, sha256 verified)",
                download_script(dv.data_url, dv.data_sha256, DEMO_DATA, "root"),
                when=lambda c: c[state] is None or c[state].sha256 != dv.data_sha256,
                needs=(state,),
                timeout=300,
            )
        ]
    local = Path(dv.data_file).expanduser() if dv.data_file else DEMO_SOURCE / DATA_IN_TREE
    what = f"demo.data_file {local}" if dv.data_file else f"the shipped data file {local}"
    try:
        data = local.read_bytes()
    except OSError as exc:
        raise StepError(f"{what}: {exc.strerror}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != dv.data_sha256:
        raise StepError(
            f"{what}: checksum mismatch (sha256 {got}, expected {dv.data_sha256}); "
            "use the original file or set demo.data_sha256"
        )
    label = "data (uploaded)" if dv.data_file else "data (shipped copy)"
    return [File(DEMO_DATA, data, "root", "root", 0o644, label=label)]


def build(ctx: RoleContext) -> list[Step]:
    if not DEMO_SOURCE.is_dir():
        raise StepError(f"{DEMO_SOURCE} is missing: the demo code ships with mlflow-stack")
    v = ctx.vars
    place = layout.Layout.of(v)
    server = layout.db_server(ctx.os, v.mysql.server)
    readme = render(
        "demo/README.j2",
        host=ctx.host,
        mlflow_port=v.mlflow.port,
        jupyter_port=v.jupyter.port,
        user=DEMO_USER,
        root=DEMO_ROOT,
        data_path=DEMO_DATA,
        data_sha256=v.demo.data_sha256,
        python_prefix=v.python.prefix,
        db=f"{server.package} on 127.0.0.1:{v.mysql.port} (databases mlflow, optuna)"
        if v.mlflow.backend == "mysql"
        else f"SQLite, {layout.MLFLOW_SQLITE}",
    )
    setenv = render(
        "demo/setenv.sh.j2",
        tracking_uri=place.tracking_uri,
        data_path=DEMO_DATA,
        env_prefix=place.env(layout.DEMO_ENV),
    )
    warm = ctx.sizing.warm_runner(v.demo.warm_runner)
    return [
        *demo_account(warm == "always"),
        *tree_steps(
            DEMO_SOURCE,
            DEMO_CODE,
            "root",
            "root",
            (WARM_UNIT,) if warm == "always" else (),  # on demand: it sees the change itself
            elsewhere=frozenset({DATA_IN_TREE}),
        ),
        *data_steps(ctx),
        notebooks_step(place.python(layout.DEMO_ENV)),
        File(layout.DEMO_SETENV, setenv),
        File(layout.DEMO_README, readme),
        *warm_runner_steps(place.env(layout.DEMO_ENV), warm, ctx.sizing.malloc_arenas),
    ]


def notebooks_step(python: str) -> Run:
    """The shipped notebooks into the account's workspace, as the account (new ones copied,
    unedited ones updated, edited ones kept: `demo_wine.workspace`)."""
    shipped = f"file:{DEMO_CODE}/notebooks/"
    seeded = F.PathState(f"{layout.DEMO_WORKSPACE}/notebooks")
    return Run(
        "notebooks in the workspace",
        f"mkdir -p {layout.DEMO_WORKSPACE} && cd {layout.DEMO_STATE} && "
        f"PYTHONPATH={DEMO_ROOT} PYTHONDONTWRITEBYTECODE=1 {python} -m demo_wine.workspace "
        f"{layout.DEMO_WORKSPACE}",
        when=lambda c: c[seeded] is None or any(i.startswith(shipped) for i in c.changed),
        needs=(seeded,),
        user=DEMO_USER,
    )


def warm_runner_steps(env_prefix: str, mode: str, malloc_arenas: int | None) -> list[Step]:
    """The warm runner and its socket. `always`: both enabled and running; `on-demand`: the
    socket alone (the first run starts the runner, which exits when idle); `off`: neither."""
    on, always = mode != "off", mode == "always"
    unit = render(
        "systemd/demo-wine-warm.service.j2",
        user=DEMO_USER,
        state=layout.DEMO_STATE,
        state_name=layout.DEMO_STATE.removeprefix("/var/lib/"),
        code_root=DEMO_ROOT,
        pycache=layout.DEMO_PYCACHE,
        env_prefix=env_prefix,
        socket=layout.WARM_SOCKET,
        socket_unit=WARM_SOCKET_UNIT,
        idle=0 if always else WARM_IDLE_S,
        malloc_arenas=malloc_arenas,
    )
    socket_unit = render(
        "systemd/demo-wine-warm.socket.j2", socket=layout.WARM_SOCKET, user=DEMO_USER
    )
    service, socket = F.Unit(WARM_UNIT), F.Unit(WARM_SOCKET_UNIT)
    unit_file = File(layout.unit_file(WARM_UNIT), unit, notify=(WARM_UNIT,) if always else (),
                     unit_file=True)  # fmt: skip

    def stop_script(c: PlanContext) -> str:
        # A runner from before the socket unit bound the socket itself: it lets go of it. On
        # demand, a changed unit applies at the next start.
        leftover = "" if c[socket].active else f" && rm -f {layout.WARM_SOCKET}"
        return f"systemctl stop {WARM_UNIT}{leftover}"

    return [
        unit_file,
        File(layout.unit_file(WARM_SOCKET_UNIT), socket_unit, unit_file=True),
        Run("warm runner stopped (it starts again on demand)", stop_script,
            when=lambda c: on and c[service].active and (not c[socket].active or (
                not always and unit_file.id in c.changed)),
            needs=(service, socket)),
        Service(WARM_SOCKET_UNIT, enabled=on, running=on),
        Service(WARM_UNIT, enabled=always, running=always if always or not on else None),
    ]  # fmt: skip


role = Role("demo_files", build)
