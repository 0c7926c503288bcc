"""`invoke serve`: an MLflow model server as a templated systemd unit, converged by the engine."""

from __future__ import annotations

import io
import json
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_stack import hostside, inputs, layout
from mlflow_stack.actions.remote import ActionError, require_provisioned
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.probing import probe
from mlflow_stack.engine.report import Reporter
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.runner import HostJob, Options, converge_host
from mlflow_stack.engine.steps import Directory, File, Service, Step, WaitHttp
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import MODELS_CONF_DIR, Layout, model_env_file, model_unit

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars

NAME = inputs.INSTANCE  # a served instance's name: it names a unit and an env file
# The unit's program (MLflow's scoring app under uvicorn, one Python start) and its fast path
# for the common /invocations request, which it imports from the same directory.
PROGRAMS = ("model_server.py", "fast_scoring.py")
SERVER_PATH = f"{layout.HOSTSIDE_DIR}/model_server.py"


def served_fact() -> F.Shell:
    """The served instances and their ports, one `NAME PORT` line each."""
    return F.Shell(
        "served models",
        f"cd {MODELS_CONF_DIR} 2>/dev/null && "
        "for f in *.env; do echo \"${f%.env} $(sed -n 's/^PORT=//p' $f)\"; done",
    )


def parse_served(result: F.ShellResult) -> dict[str, int]:
    pairs = (line.split() for line in result.output.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def served(host: Host) -> dict[str, int]:
    """Served instance name → port on the host."""
    return parse_served(probe(host, [served_fact()])[served_fact().key])


@dataclass(frozen=True)
class ServeRequest:
    name: str
    model_ref: str
    port: int
    workers: int

    def validate(self) -> None:
        inputs.instance_name(self.name)
        if self.model_ref.startswith("models:/"):
            inputs.model_uri(self.model_ref)
        elif self.model_ref:
            inputs.run_id(self.model_ref)
        if not 1024 <= self.port <= 65535:
            raise ActionError(f"--port {self.port}: choose a port between 1024 and 65535")
        if not 0 <= self.workers <= 16:
            raise ActionError(f"--workers {self.workers}: choose 1 to 16, or 0 for one per CPU")


def resolve_model(host: Host, place: Layout, ref: str) -> dict:
    """Resolve a run id or models:/ URI on the host (the tracking server is local there).

    A registered model's name may hold quotes, `$()` or `;` (MLflow allows them): the
    reference is one quoted argument, and the URI that comes back must be text without
    control characters (it goes into the instance's env file, quoted there too)."""
    result = host.run(
        f"python3 - {shlex.quote(place.tracking_uri)} {shlex.quote(ref)}",
        stdin=hostside.read("resolve_model.py"),
        sudo=False,
    )
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        answer = {}
    if not isinstance(answer, dict) or "error" in answer or not answer.get("uri"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ActionError(
            inputs.one_line(str(error))
            if error
            else f"resolving {inputs.show(ref)} failed: {inputs.one_line(result.tail())}"
        )
    inputs.text(answer["uri"], "the resolved model URI", max_len=1024)
    return answer


def check_port(host: Host, name: str, port: int) -> None:
    """The port must be free, or already be this instance's."""
    script = (
        f"cur=$(sed -n 's/^PORT=//p' {model_env_file(name)} 2>/dev/null); "
        f'busy=$(ss -Hltn "sport = :{port}" | head -1); '
        f'[ -z "$busy" ] && echo free || echo "busy $cur"'
    )
    state = host.run(script).stdout.strip()
    if state.startswith("busy") and state.split()[1:] != [str(port)]:
        raise ActionError(
            f"port {port} on {host.name} is already in use by another process; "
            "choose another with --port"
        )


def serve_steps(req: ServeRequest, uri: str, place: Layout) -> list[Step]:
    unit = model_unit(req.name)
    env_text = render(
        "serving/model.env.j2",
        name=req.name,
        model_uri=uri,
        bind="127.0.0.1",
        port=req.port,
        workers=req.workers,
        tracking_uri=place.tracking_uri,
    )
    template = render(
        "systemd/mlflow-model@.service.j2",
        user=layout.DEMO_USER,
        cache=layout.MODELS_CACHE,
        cache_name=layout.MODELS_CACHE.removeprefix("/var/cache/"),
        conf_dir=MODELS_CONF_DIR,
        env_prefix=place.env(layout.DEMO_ENV),
        server=SERVER_PATH,
    )
    programs = [
        File(f"{layout.HOSTSIDE_DIR}/{name}", hostside.read(name), notify=(unit,))
        for name in PROGRAMS
    ]
    return [
        Directory(MODELS_CONF_DIR, "root", layout.DEMO_USER, 0o750),
        Directory(layout.HOSTSIDE_DIR, "root", "root", 0o755),
        *programs,
        File(model_env_file(req.name), env_text, "root", layout.DEMO_USER, 0o640, notify=(unit,)),
        File(
            layout.unit_file(layout.MODEL_UNIT_TEMPLATE), template, notify=(unit,), unit_file=True
        ),
        Service(unit),
        WaitHttp(
            f"model {req.name} answers /ping",
            f"http://127.0.0.1:{req.port}/ping",
            timeout=120,
            after=(unit,),
        ),
    ]


@dataclass
class ServeResult:
    name: str
    uri: str
    port: int
    changed: bool
    seconds: float
    run_id: str = ""
    version: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/invocations"


def serve(host: Host, host_vars: HostVars, req: ServeRequest) -> ServeResult:
    started = time.monotonic()
    req.validate()
    place = Layout.of(host_vars)
    require_provisioned(host, place)
    model = resolve_model(host, place, req.model_ref)
    check_port(host, req.name, req.port)
    role = Role("serve", lambda ctx: serve_steps(req, model["uri"], place))
    recap = converge_host(HostJob(host, [role], host_vars), Options(), Reporter(io.StringIO()))
    failure = recap.failure()
    if failure:
        journal = host.run(f"journalctl -u {model_unit(req.name)} -n 5 --no-pager -o cat")
        raise ActionError(f"{failure}; last log lines: {journal.tail(3)}")
    return ServeResult(
        req.name,
        model["uri"],
        req.port,
        bool(recap.changed_steps),
        time.monotonic() - started,
        model.get("run_id", ""),
        model.get("version", ""),
    )


def stop(host: Host, name: str) -> bool:
    """Stop and remove a served model; False when there was none of that name."""
    inputs.instance_name(name)  # it names a unit and a file in a root shell
    unit = model_unit(name)
    env = model_env_file(name)
    script = (
        f"if [ -f {env} ] || systemctl -q is-active {unit}; then "
        f"systemctl disable --now {unit} 2>/dev/null; rm -f {env}; echo stopped; "
        "fi"
    )
    return host.check(script, f"stopping {unit}").stdout.strip() == "stopped"


def curl_example(port: int) -> str:
    from mlflow_stack.actions.predict import SAMPLE_WINE, dataframe_split

    payload = json.dumps(dataframe_split([SAMPLE_WINE]))
    return (
        f"curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' "
        f"-d '{payload}'"
    )
