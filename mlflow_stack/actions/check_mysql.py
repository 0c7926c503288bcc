"""`invoke check-mysql`: the original demo's MySQL troubleshooting, automated.

One SSH round-trip gathers the host-side checks (service, root socket, charset, tables,
schema head of the installed MLflow, counts); then the `mlflow` user logs in with PyMySQL
through an SSH tunnel from the controller, as a client on another machine would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pymysql

from mlflow_stack import layout
from mlflow_stack.actions.remote import ActionError, read_secret
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.forward import forward_unix
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.probing import probe
from mlflow_stack.layout import Layout

EXPECTED_SCRIPT = (
    "import json; from mlflow.store.db.utils import _get_latest_schema_revision as head; "
    "from mlflow.store.db.base_sql_model import Base; "
    "import mlflow.store.tracking.dbmodels.models, mlflow.store.model_registry.dbmodels.models; "
    "print(json.dumps({'head': head(), 'tables': sorted(Base.metadata.tables)}))"
)
COUNTS = {
    "experiments": "SELECT COUNT(*) FROM mlflow.experiments",
    "runs": "SELECT COUNT(*) FROM mlflow.runs",
    "registered models": "SELECT COUNT(*) FROM mlflow.registered_models",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


def sql_fact(name: str, query: str) -> F.Shell:
    return F.Shell(name, f'mysql -N -B -e "{query}"')


def host_facts(place: Layout) -> dict[str, F.Fact]:
    return {
        "os": F.OsRelease(),
        **{f"unit {db.service}": F.Unit(db.service) for db in (layout.MARIADB, layout.MYSQL)},
        "socket": sql_fact("root socket", "SELECT CURRENT_USER()"),
        "charset": sql_fact(
            "charset",
            "SELECT default_character_set_name, default_collation_name "
            "FROM information_schema.schemata WHERE schema_name='mlflow'",
        ),
        "tables": sql_fact("tables", "SHOW TABLES FROM mlflow"),
        "revision": sql_fact("revision", "SELECT version_num FROM mlflow.alembic_version"),
        "expected": F.Shell(
            "expected schema",
            f'cd / && {place.python(layout.MLFLOW_ENV)} -c "{EXPECTED_SCRIPT}"',
        ),
        **{f"count {k}": sql_fact(f"count {k}", q) for k, q in COUNTS.items()},
    }


def evaluate(values: dict, unit: F.UnitInfo, service: str) -> tuple[list[Check], dict]:
    """Pure: host-side fact values → checks and counts."""
    checks = [
        Check(
            f"service {service}",
            unit.active,
            unit.active_state,
            f"sudo systemctl start {service}; journalctl -u {service}",
        ),
    ]
    sock = values["socket"]
    checks.append(
        Check(
            "root login through the local socket",
            sock.ok,
            sock.output.strip() or "refused",
            "the server is down or root's unix_socket auth was changed; run invoke provision",
        )
    )
    charset = values["charset"].output.split()
    checks.append(
        Check(
            "database mlflow in utf8mb4",
            charset == ["utf8mb4", "utf8mb4_bin"],
            " / ".join(charset) or "missing",
            "run invoke provision (creates it utf8mb4 / utf8mb4_bin)",
        )
    )
    try:
        expected = json.loads(values["expected"].output.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        expected = None
    tables = set(values["tables"].output.split())
    if expected is None:
        checks.append(
            Check(
                "tables match the installed MLflow",
                False,
                "cannot read the schema of the mlflow env",
                "run invoke provision (the mlflow env is missing or broken)",
            )
        )
    else:
        want = set(expected["tables"])
        missing = sorted(want - tables)
        extra = sorted(tables - want - {"alembic_version"})
        detail = f"{len(tables)} tables"
        if missing:
            detail += f"; missing: {', '.join(missing[:6])}"
        if extra:
            detail += f"; unexpected: {', '.join(extra[:6])}"
        checks.append(
            Check(
                "tables match the installed MLflow",
                not missing,
                detail,
                "restart mlflow-server.service or run invoke provision (migrates the schema)",
            )
        )
        revision = values["revision"].output.strip()
        checks.append(
            Check(
                "schema revision is the installed MLflow's head",
                revision == expected["head"],
                f"{revision or 'none'} (head {expected['head']})",
                "run invoke provision (runs the migration)",
            )
        )
    counts = {}
    for key in COUNTS:
        result = values[f"count {key}"]
        counts[key] = int(result.output.strip()) if result.ok and result.output.strip() else None
    return checks, counts


def client_login(host: Host, db_port: int) -> Check:
    """Log in as `mlflow` with its password through an SSH tunnel, as a remote client."""
    password = read_secret(host, "db_password")
    try:
        with forward_unix(host, db_port) as local:  # a private socket, not a local TCP port
            conn = pymysql.connect(
                unix_socket=str(local),
                user=layout.DB_USER,
                password=password.reveal(),
                database="mlflow",
                connect_timeout=10,
            )
            with conn.cursor() as cur:
                cur.execute("SELECT DATABASE(), CURRENT_USER()")
                db, who = cur.fetchone()
            conn.close()
    except pymysql.MySQLError as exc:
        return Check(
            "user mlflow logs in (PyMySQL over an SSH tunnel)",
            False,
            str(exc.args[-1]) if exc.args else str(exc),
            "run invoke provision (resets the user and its password)",
        )
    return Check("user mlflow logs in (PyMySQL over an SSH tunnel)", True, f"{who} on {db}")


def check_mysql(host: Host, place: Layout) -> tuple[list[Check], dict]:
    facts = host_facts(place)
    values = {name: v for name, v in zip(facts, _probe_values(host, facts), strict=True)}
    server = layout.db_server(values["os"], place.db_choice)
    unit = values[f"unit {server.service}"]
    checks, counts = evaluate(values, unit, server.service)
    if unit.active:
        try:
            checks.append(client_login(host, place.db_port))
        except ActionError as exc:
            checks.append(
                Check(
                    "user mlflow logs in (PyMySQL over an SSH tunnel)",
                    False,
                    str(exc),
                    "run invoke provision",
                )
            )
    return checks, counts


def _probe_values(host: Host, facts: dict[str, F.Fact]) -> list:
    gathered = probe(host, list(facts.values()))
    return [gathered[f.key] for f in facts.values()]


def render_table(checks: list[Check], counts: dict) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}" for c in checks]
    shown = ", ".join(f"{k}: {v}" for k, v in counts.items() if v is not None)
    if shown:
        lines.append(f"counts: {shown}")
    return "\n".join(lines)
