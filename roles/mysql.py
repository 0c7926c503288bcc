"""Role `mysql`: MariaDB (Debian) or MySQL (Ubuntu), secured, with MLflow's databases and user.

The database's users, grants and schemas are read in one query and compared with the wanted
state by pure functions; only the missing SQL is sent, on stdin (never on a command line).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mlflow_stack import layout, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    Apt,
    Change,
    Cmd,
    File,
    MaskedUnit,
    PlanContext,
    Schedule,
    Service,
    Step,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import DATABASES, DB_USER, TUNING_DB_USER, DbServer

CHARSET, COLLATION = "utf8mb4", "utf8mb4_bin"
REQUIRED_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "INDEX", "REFERENCES"}
)
PASSWORD_ENV = "MLFLOW_DB_PASSWORD"
TUNING_PASSWORD_ENV = "MLFLOW_TUNING_DB_PASSWORD"


def native_clause(server: DbServer) -> str:
    """How CREATE/ALTER USER asks for mysql_native_password on `server`."""
    return " WITH mysql_native_password" if server == layout.MYSQL else ""


def native_password_hash(password: str) -> str:
    """The `mysql_native_password` hash: '*' + SHA1(SHA1(password)), upper-case hex."""
    inner = hashlib.sha1(password.encode()).digest()
    return "*" + hashlib.sha1(inner).hexdigest().upper()


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def account(user: str, host: str) -> str:
    return f"{sql_string(user)}@{sql_string(host)}"


# --- state of the database server ------------------------------------------------------

STATE_QUERY = role_facts.STATE_QUERY


@dataclass
class DbState:
    """Users, databases and privileges as the server reports them."""

    users: dict[tuple[str, str], str] = field(default_factory=dict)  # (user, host) → auth
    databases: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (cs, coll)
    db_privileges: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    global_privileges: dict[str, set[str]] = field(default_factory=dict)  # grantee → privs


def grantee(user: str, host: str) -> str:
    return f"'{user}'@'{host}'"


def parse_state(output: str) -> DbState:
    """Parse the tab-separated rows of `STATE_QUERY` (mysql -N -B)."""
    state = DbState()
    for line in output.splitlines():
        row = line.split("\t")
        kind = row[0]
        if kind == "user" and len(row) == 4:
            state.users[(row[1], row[2])] = row[3]
        elif kind == "db" and len(row) == 4:
            state.databases[row[1]] = (row[2], row[3])
        elif kind == "dbpriv" and len(row) == 4:
            state.db_privileges.setdefault((row[1], row[2]), set()).add(row[3])
        elif kind == "globalpriv" and len(row) == 3:
            state.global_privileges.setdefault(row[1], set()).add(row[2])
    return state


def state_fact() -> F.Fact:
    """Users, databases and grants, read from the running server (again after a change: the
    server may have been stopped, or reinstalled over old data, when the run began)."""
    return role_facts.MysqlState()


@dataclass(frozen=True)
class Account:
    """A database account: its password, the client hosts it may log in from, the databases
    it has rights on (those alone)."""

    user: str
    password: str
    hosts: tuple[str, ...]
    databases: tuple[str, ...]


@dataclass(frozen=True)
class Wanted:
    accounts: tuple[Account, ...]
    server: DbServer


def _privileges_ok(state: DbState, who: str, databases: tuple[str, ...]) -> bool:
    if state.global_privileges.get(who):
        return False
    schemas = {schema for (g, schema) in state.db_privileges if g == who}
    if schemas != set(databases):
        return False
    return all(state.db_privileges[(who, db)] >= REQUIRED_PRIVILEGES for db in databases)


def plan_sql(state: DbState, wanted: Wanted) -> list[tuple[str, str]]:
    """(what, statement) pairs that bring the server to the wanted state; [] when it is."""
    out: list[tuple[str, str]] = []
    managed = {a.user: a for a in wanted.accounts}
    for user, host in sorted(state.users):
        if user == "":
            out.append((f"drop anonymous user @{host}", f"DROP USER {account('', host)};"))
        elif user == "root" and host != "localhost":
            out.append((f"drop remote root@{host}", f"DROP USER {account('root', host)};"))
        elif user in managed and host not in managed[user].hosts:
            out.append((f"drop {user}@{host}", f"DROP USER {account(user, host)};"))
    if "test" in state.databases:
        out.append(("drop database test", "DROP DATABASE test;"))
    if any(schema in ("test", "test\\_%") for (_, schema) in state.db_privileges):
        out.append(
            ("remove test grants", "DELETE FROM mysql.db WHERE Db='test' OR Db='test\\\\_%';")
        )
    for db in DATABASES:
        spec = f"CHARACTER SET {CHARSET} COLLATE {COLLATION}"
        if db not in state.databases:
            out.append((f"create database {db}", f"CREATE DATABASE `{db}` {spec};"))
        elif state.databases[db] != (CHARSET, COLLATION):
            out.append((f"set {db} to {CHARSET}", f"ALTER DATABASE `{db}` {spec};"))
    for acct in wanted.accounts:
        out += _account_sql(state, acct, wanted.server)
    if out:
        out.append(("flush privileges", "FLUSH PRIVILEGES;"))
    return out


def _account_sql(state: DbState, acct: Account, server: DbServer) -> list[tuple[str, str]]:
    out = []
    digest = native_password_hash(acct.password)
    identified = f"IDENTIFIED{native_clause(server)} BY {sql_string(acct.password)}"
    for host in acct.hosts:
        who = account(acct.user, host)
        name = f"{acct.user}@{host}"
        if (acct.user, host) not in state.users:
            out.append((f"create user {name}", f"CREATE USER {who} {identified};"))
        elif state.users[(acct.user, host)] != digest:
            out.append((f"set password of {name}", f"ALTER USER {who} {identified};"))
        if not _privileges_ok(state, grantee(acct.user, host), acct.databases):
            out.append(
                (
                    f"grant {name} rights on {', '.join(acct.databases)} only",
                    f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM {who}; "
                    + " ".join(
                        f"GRANT ALL PRIVILEGES ON `{db}`.* TO {who};" for db in acct.databases
                    ),
                )
            )
    return out


@dataclass
class SecureDatabase(Step):
    """Anonymous users, test database and remote root gone; the databases and their accounts."""

    wanted: Wanted

    def __post_init__(self) -> None:
        self.id = "mysql:databases"
        users = " and ".join(a.user for a in self.wanted.accounts)
        self.label = f"databases {', '.join(DATABASES)}, accounts {users}"

    def facts(self) -> list[F.Fact]:
        return [state_fact()]

    def plan(self, ctx: PlanContext) -> Change | None:
        result = ctx[state_fact()]
        state = parse_state(result.output) if result.ok else DbState()
        statements = plan_sql(state, self.wanted)
        if not statements:
            return None
        summary = "; ".join(what for what, _ in statements if what != "flush privileges")
        sql = "\n".join(stmt for _, stmt in statements) + "\n"
        return Change(summary, [Cmd("mysql --batch", stdin=sql)], secret=True)


def build(ctx: RoleContext) -> list[Step]:
    mv = ctx.vars.mysql
    server = layout.db_server(ctx.os)
    password = ctx.secret("db_password", env=PASSWORD_ENV)
    tuning = ctx.secret("db_tuning_password", env=TUNING_PASSWORD_ENV)
    local = ("localhost", "127.0.0.1")
    accounts = (
        Account(DB_USER, password.reveal(), local, ("mlflow",)),
        # tuning processes (the demo account's, workers on other hosts): Optuna's studies only
        Account(
            TUNING_DB_USER,
            tuning.reveal(),
            tuple(dict.fromkeys((*local, *mv.allow_from))),
            ("optuna",),
        ),
    )
    conf = render("mysql/60-mlflow-stack.cnf.j2", bind_address=mv.bind_address, port=mv.port)
    return [
        Apt((server.package,), schedule=Schedule.EARLY),  # installs while anaconda runs
        *(MaskedUnit(unit, notify=(server.service,)) for unit in server.sockets),
        File(server.conf_file, conf, notify=(server.service,)),
        Service(server.service),
        *ctx.secret_steps(
            "db_password",
            "db_tuning_password",
            env={"db_password": PASSWORD_ENV, "db_tuning_password": TUNING_PASSWORD_ENV},
        ),
        SecureDatabase(Wanted(accounts, server)),
    ]


role = Role("mysql", build)
