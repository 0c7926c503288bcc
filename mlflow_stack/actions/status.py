"""`invoke status` and `invoke urls`: what runs on a host, whether it answers, how to log in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_stack import layout
from mlflow_stack.actions import serve as serving
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.probing import probe
from mlflow_stack.layout import Layout

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars
    from mlflow_stack.targets import ResolvedHost


@dataclass
class ServiceStatus:
    unit: str
    state: str
    health: str
    version: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("active", "on demand") and self.health.startswith("ok")


def _get(url: str) -> F.Shell:
    return F.Shell(f"GET {url}", f"curl -s -m 3 -w '\\n%{{http_code}}' {url}")


def _answer(result: F.ShellResult) -> tuple[int, str]:
    body, _, code = result.output.rpartition("\n")
    return (int(code) if code.strip().isdigit() else 0), body


def _health(result: F.ShellResult) -> str:
    code, _ = _answer(result)
    return f"ok ({code})" if 200 <= code < 300 else ("no answer" if code == 0 else f"HTTP {code}")


def gather(host: Host, place: Layout) -> list[ServiceStatus]:
    """Every unit of the stack with its state, health endpoint and version, in two probes."""
    models = serving.served_fact()
    first = probe(host, [F.OsRelease(), models])
    served = serving.parse_served(first[models.key]).items()
    db_unit = layout.db_server(first[F.OsRelease().key], place.db_choice).service
    mlflow_url = f"http://127.0.0.1:{place.mlflow_port}"
    jupyter_url = place.jupyter_url
    units: dict[str, tuple[F.Fact, F.Fact | None]] = {
        db_unit: (F.Shell("db ping", "mysqladmin ping"), F.Shell("db version", "mysql -V")),
        layout.MLFLOW_UNIT: (_get(f"{mlflow_url}/health"), _get(f"{mlflow_url}/version")),
        layout.JUPYTER_UNIT: (_get(f"{jupyter_url}/api"), _get(f"{jupyter_url}/api")),
    }
    warm_unit = layout.WARM_UNIT
    units[warm_unit] = (F.Shell("warm socket", f"test -S {layout.WARM_SOCKET}"), None)
    for name, port in served:
        url = f"http://127.0.0.1:{port}"
        units[layout.model_unit(name)] = (_get(f"{url}/ping"), _get(f"{url}/version"))
    facts = [F.Unit(u) for u in (*units, layout.WARM_SOCKET_UNIT)]
    facts += [f for pair in units.values() for f in pair if f]
    values = probe(host, facts)
    out = []
    for unit, (health_fact, version_fact) in units.items():
        info = values[F.Unit(unit).key]
        state = info.active_state if info.exists else "not installed"
        if unit == warm_unit:
            socket = values[F.Unit(layout.WARM_SOCKET_UNIT).key]
            if not (info.enabled or info.active or socket.active):  # turned off
                continue
            health = "ok (socket)" if values[health_fact.key].ok else "no socket"
            version = ""
            if not info.active and socket.active:  # small profile: the first run starts it
                state, health = "on demand", "ok (socket)"
        elif unit == db_unit:
            alive = values[health_fact.key]
            health = "ok (ping)" if alive.ok else "no answer"
            version = values[version_fact.key].output.strip().split(" Distrib ")[-1].split(",")[0]
        else:
            health = _health(values[health_fact.key])
            version = _version(values[version_fact.key])
        out.append(ServiceStatus(unit, state, health, version if info.exists else ""))
    return out


def _version(result: F.ShellResult) -> str:
    code, body = _answer(result)
    if not 200 <= code < 300:
        return ""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:30]
    return str(data.get("version", "")) if isinstance(data, dict) else str(data)


def render_status(host: str, rows: list[ServiceStatus]) -> str:
    width = max(len(r.unit) for r in rows)
    lines = [f"{host}: {'all healthy' if all(r.ok for r in rows) else 'NOT all healthy'}"]
    for r in rows:
        lines.append(
            f"  {'ok ' if r.ok else 'BAD'} {r.unit:<{width}}  {r.state:<13} "
            f"{r.health:<12} {r.version}"
        )
    return "\n".join(lines)


IMDS_PUBLIC_IP = (
    "t=$(curl -s -m 2 -X PUT http://169.254.169.254/latest/api/token "
    "-H 'X-aws-ec2-metadata-token-ttl-seconds: 60') && "
    'curl -s -m 2 -H "X-aws-ec2-metadata-token: $t" '
    "http://169.254.169.254/latest/meta-data/public-ipv4"
)


def public_address(host: Host, fallback: str) -> str:
    """The EC2 public IPv4 from the instance metadata service (IMDSv2), else `fallback`."""
    result = host.run(IMDS_PUBLIC_IP, sudo=False)
    text = result.stdout.strip()
    parts = text.split(".")
    is_ip = len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)
    return text if result.ok and is_ip else fallback


def urls(host_vars: HostVars, address: str, token: str | None, reveal: bool) -> list[str]:
    """Lines telling where each UI is and how to log in."""
    mv, jv = host_vars.mlflow, host_vars.jupyter
    mlflow_host = address if mv.public else "127.0.0.1"
    jupyter_host = address if jv.public else "127.0.0.1"
    lines = [f"MLflow   http://{mlflow_host}:{mv.port}/"]
    if mv.public:
        lines.append(
            f"         user {layout.MLFLOW_ADMIN}; password: sudo cat "
            f"{layout.secret_path('mlflow_admin_password')} (on the host)"
        )
    if jv.auth == "token":
        shown = token if (reveal and token) else "<token>"
        lines.append(f"Jupyter  http://{jupyter_host}:{jv.port}/lab?token={shown}")
        if not reveal:
            lines.append("         (`invoke urls --reveal` prints the token)")
    else:
        lines.append(f"Jupyter  http://{jupyter_host}:{jv.port}/lab  (password login)")
    if not (mv.public and jv.public):
        lines.append("Local-only services: run `invoke tunnel` and open the 127.0.0.1 URLs.")
    return lines


def login_lines(host: Host, resolved: ResolvedHost, reveal: bool) -> list[str]:
    """`invoke urls`: where each UI is (the public address when opened) and how to log in."""
    from mlflow_stack.actions.remote import read_secret

    v = resolved.vars
    address = resolved.target.address
    if v.mlflow.public or v.jupyter.public:
        address = public_address(host, address)
    token = None
    if reveal and v.jupyter.auth == "token":
        token = read_secret(host, "jupyter_token").reveal()
    return urls(v, address, token, reveal)
