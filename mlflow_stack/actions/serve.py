"""`invoke serve`: an MLflow model server as a templated systemd unit, converged by the engine."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow_stack.actions.remote import ActionError, Layout, error_tail, require_provisioned
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.report import Reporter, Status
from mlflow_stack.engine.runner import HostJob, Options, Role, converge_host, probe
from mlflow_stack.engine.steps import Directory, File, Service, Step, WaitHttp
from mlflow_stack.engine.templating import render

CONF_DIR = "/etc/mlflow-models"
TEMPLATE_UNIT = "mlflow-model@.service"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
RESOLVER = Path(__file__).with_name("resolve_model.py")
# The unit's program: MLflow's scoring app under uvicorn, one Python start (see the file).
SERVER_SCRIPT = Path(__file__).with_name("model_server.py")
SERVER_PATH = "/usr/local/lib/mlflow-stack/model_server.py"
# Its fast path for the common /invocations request, imported from the same directory.
FAST_PATH_SCRIPT = Path(__file__).with_name("fast_scoring.py")
FAST_PATH_PATH = str(Path(SERVER_PATH).with_name("fast_scoring.py"))


def served_fact() -> F.Shell:
    """The served instances and their ports, one `NAME PORT` line each."""
    return F.Shell(
        "served models",
        f"cd {CONF_DIR} 2>/dev/null && "
        "for f in *.env; do echo \"${f%.env} $(sed -n 's/^PORT=//p' $f)\"; done",
    )


def parse_served(result: F.ShellResult) -> dict[str, int]:
    pairs = (line.split() for line in result.output.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def served(host: Host) -> dict[str, int]:
    """Served instance name → port on the host."""
    return parse_served(probe(host, [served_fact()])[served_fact().key])


def unit_name(name: str) -> str:
    return f"mlflow-model@{name}.service"


@dataclass(frozen=True)
class ServeRequest:
    name: str
    model_ref: str
    port: int
    workers: int

    def validate(self) -> None:
        if not NAME.match(self.name):
            raise ActionError(f"--name {self.name!r}: use lower-case letters, digits, - and _")
        if not 1024 <= self.port <= 65535:
            raise ActionError(f"--port {self.port}: choose a port between 1024 and 65535")
        if not 0 <= self.workers <= 16:
            raise ActionError(f"--workers {self.workers}: choose 1 to 16, or 0 for one per CPU")


def resolve_model(host: Host, layout: Layout, ref: str) -> dict:
    """Resolve a run id or models:/ URI on the host (the tracking server is local there)."""
    result = host.run(
        f"python3 - {layout.tracking_uri} '{ref}'", stdin=RESOLVER.read_text(), sudo=False
    )
    answer = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    if "error" in answer or not answer:
        raise ActionError(answer.get("error") or f"resolving {ref} failed: {error_tail(result)}")
    return answer


def check_port(host: Host, name: str, port: int) -> None:
    """The port must be free, or already be this instance's."""
    script = (
        f"cur=$(sed -n 's/^PORT=//p' {CONF_DIR}/{name}.env 2>/dev/null); "
        f'busy=$(ss -Hltn "sport = :{port}" | head -1); '
        f'[ -z "$busy" ] && echo free || echo "busy $cur"'
    )
    state = host.run(script).stdout.strip()
    if state.startswith("busy") and state.split()[1:] != [str(port)]:
        raise ActionError(
            f"port {port} on {host.name} is already in use by another process; "
            "choose another with --port"
        )


def serve_steps(req: ServeRequest, uri: str, layout: Layout) -> list[Step]:
    unit = unit_name(req.name)
    env_text = render(
        "serving/model.env.j2",
        name=req.name,
        model_uri=uri,
        bind="127.0.0.1",
        port=req.port,
        workers=req.workers,
        tracking_uri=layout.tracking_uri,
    )
    template = render(
        "systemd/mlflow-model@.service.j2",
        user=layout.demo_user,
        home=layout.demo_root,
        conf_dir=CONF_DIR,
        env_prefix=f"{layout.prefix}/envs/demo",
        server=SERVER_PATH,
    )
    return [
        Directory(CONF_DIR, "root", layout.demo_user, 0o750),
        Directory(str(Path(SERVER_PATH).parent), "root", "root", 0o755),
        File(SERVER_PATH, SERVER_SCRIPT.read_text(), notify=(unit,)),
        File(FAST_PATH_PATH, FAST_PATH_SCRIPT.read_text(), notify=(unit,)),
        File(
            f"{CONF_DIR}/{req.name}.env", env_text, "root", layout.demo_user, 0o640, notify=(unit,)
        ),
        File(f"/etc/systemd/system/{TEMPLATE_UNIT}", template, notify=(unit,), unit_file=True),
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


def serve(host: Host, layout: Layout, req: ServeRequest, vars) -> ServeResult:
    started = time.monotonic()
    req.validate()
    require_provisioned(host, layout)
    model = resolve_model(host, layout, req.model_ref)
    check_port(host, req.name, req.port)
    role = Role("serve", lambda ctx: serve_steps(req, model["uri"], layout))
    recap = converge_host(HostJob(host, [role], vars), Options(), Reporter(io.StringIO()))
    if recap.failed:
        failure = recap.error or next(
            f"{r.step}: {r.summary}" for r in recap.results if r.status == Status.FAILED
        )
        journal = host.run(f"journalctl -u {unit_name(req.name)} -n 5 --no-pager -o cat")
        raise ActionError(f"{failure}; last log lines: {error_tail(journal, 3)}")
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
    unit = unit_name(name)
    script = (
        f"if [ -f {CONF_DIR}/{name}.env ] || systemctl -q is-active {unit}; then "
        f"systemctl disable --now {unit} 2>/dev/null; rm -f {CONF_DIR}/{name}.env; echo stopped; "
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
