"""Role `mysql`: MariaDB (Debian) or MySQL (Ubuntu), secured, with MLflow's databases and user.

The database's users, grants and schemas are read in one query and compared with the wanted
state by pure functions; only the missing SQL is sent, on stdin (never on a command line).
"""

from __future__ import annotations

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
    Run,
    Schedule,
    Service,
    Step,
    q,
    root_only,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import DATABASES, DB_USER, TUNING_DB_USER, DbServer
from roles.db_passwords import stored_password_matches

CHARSET, COLLATION = "utf8mb4", "utf8mb4_bin"
REQUIRED_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "INDEX", "REFERENCES"}
)
# Every profile. MySQL: no binary log (a single server; with it MLflow's trigger migration
# fails for a non-SUPER account, error 1419) and no X protocol listener.
SERVER_SETTINGS = {
    "mysql": {"skip-log-bin": "", "mysqlx": "OFF"},
    "mariadb": {},
}
# The small profile (1 GiB): measured, MySQL 9.7 starts at ≈ 234 MB instead of 544 MB,
# MariaDB at ≈ 85 MB instead of 115 MB (BENCHMARKS.md). Sizes are explicit: MySQL ignores a
# container's limit unless told, MariaDB never reads it.
SMALL_COMMON = {
    "performance_schema": "OFF",
    "innodb_buffer_pool_size": "64M",
    "innodb_log_buffer_size": "8M",
    "max_connections": "50",
    "thread_cache_size": "8",
    "key_buffer_size": "8M",
    "tmp_table_size": "16M",
    "max_heap_table_size": "16M",
    "table_open_cache": "256",
    "table_definition_cache": "400",
}
SMALL_SETTINGS = {
    "mysql": {**SMALL_COMMON, "innodb_redo_log_capacity": "64M", "temptable_max_ram": "32M"},
    "mariadb": {
        **SMALL_COMMON,
        "innodb_log_file_size": "64M",
        "aria_pagecache_buffer_size": "8M",
        "query_cache_size": "0",
        "query_cache_type": "OFF",
    },
}
OLD_CONF_NAME = "60-mlflow-stack.cnf"  # our file's name in either directory before
PASSWORD_ENV = "MLFLOW_DB_PASSWORD"
TUNING_PASSWORD_ENV = "MLFLOW_TUNING_DB_PASSWORD"


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def account(user: str, host: str) -> str:
    return f"{sql_string(user)}@{sql_string(host)}"


# --- state of the database server ------------------------------------------------------

STATE_QUERY = role_facts.STATE_QUERY


@dataclass
class DbState:
    """Users, databases and privileges as the server reports them."""

    # (user, host) → (plugin, HEX(authentication_string))
    users: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    tls: set[tuple[str, str]] = field(default_factory=set)  # accounts that must use TLS
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
        if kind == "user" and len(row) == 6:
            state.users[(row[1], row[2])] = (row[3], row[4])
            if row[5] not in ("", "NONE"):
                state.tls.add((row[1], row[2]))
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
    tls_hosts: tuple[str, ...] = ()  # of `hosts`, those whose connections must use TLS


@dataclass(frozen=True)
class Wanted:
    accounts: tuple[Account, ...]


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
        out += _account_sql(state, acct)
    if out:
        out.append(("flush privileges", "FLUSH PRIVILEGES;"))
    return out


def _account_sql(state: DbState, acct: Account) -> list[tuple[str, str]]:
    """The server's default authentication plugin is kept (MariaDB's native password,
    MySQL's caching_sha2_password): no deprecated plugin to ask for, none to enable."""
    out = []
    identified = f"IDENTIFIED BY {sql_string(acct.password)}"
    for host in acct.hosts:
        who = account(acct.user, host)
        name = f"{acct.user}@{host}"
        tls = host in acct.tls_hosts
        require = "REQUIRE SSL" if tls else "REQUIRE NONE"
        if (acct.user, host) not in state.users:
            out.append((f"create user {name}", f"CREATE USER {who} {identified} {require};"))
        else:
            plugin, stored = state.users[(acct.user, host)]
            if not stored_password_matches(plugin, stored, acct.password):
                out.append((f"set password of {name}", f"ALTER USER {who} {identified};"))
            if tls != ((acct.user, host) in state.tls):
                what = "require TLS of" if tls else "no TLS for"
                out.append((f"{what} {name}", f"ALTER USER {who} {require};"))
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


def tls_certificate_step(address: str, service: str) -> Run:
    """A CA and a server certificate for `address`, made on the host (the CA's key never
    leaves it); made again when the address changed. The tuning workers pin the CA."""
    d = layout.DB_TLS_DIR
    fact = role_facts.DbCertificate()
    subject = "/CN=mlflow-stack database"
    script = (
        f"{root_only(d)}; set -e; install -d -m 0750 -o root -g mysql {d}; cd {d}; "
        "[ -s ca.key ] && [ -s ca.pem ] || { "
        "openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.pem "
        f"-subj {q(subject + ' CA')} 2>/dev/null; }}; "
        "openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr "
        f"-subj {q(subject)} 2>/dev/null; "
        f"printf 'subjectAltName=IP:%s\n' {q(address)} > san.cnf; "
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 "
        "-extfile san.cnf -out server-cert.pem 2>/dev/null; rm -f server.csr san.cnf; "
        "chmod 0600 ca.key; chmod 0644 ca.pem server-cert.pem; "
        "chown root:mysql server-key.pem; chmod 0640 server-key.pem"
    )
    return Run(
        "database TLS certificate",
        script,
        when=lambda c: f"IP Address:{address}" not in c[fact].output,
        needs=(fact,),
        notify=(service,),
    )


def server_settings(server: DbServer, small: bool) -> dict[str, str]:
    """The `[mysqld]` settings for `server` beyond address, port, charset and TLS."""
    return {**SERVER_SETTINGS[server.name], **(SMALL_SETTINGS[server.name] if small else {})}


def build(ctx: RoleContext) -> list[Step]:
    mv = ctx.vars.mysql
    server = layout.db_server(ctx.os, mv.server)
    password = ctx.secret("db_password", env=PASSWORD_ENV)
    tuning = ctx.secret("db_tuning_password", env=TUNING_PASSWORD_ENV)
    local = ("localhost", "127.0.0.1")
    remote = tuple(dict.fromkeys((*ctx.workers, *mv.allow_from)))  # over TLS only
    accounts = (
        Account(DB_USER, password.reveal(), local, ("mlflow",)),
        # tuning processes (the demo account's here, each worker's from its address): Optuna's
        # studies only
        Account(TUNING_DB_USER, tuning.reveal(), (*local, *remote), ("optuna",), remote),
    )
    # Reached from the workers: on its private address too (never all), with TLS.
    bind = mv.bind_address
    if ctx.workers and bind == "127.0.0.1":
        bind = f"127.0.0.1,{ctx.private_address}"
    conf = render(
        "mysql/60-mlflow-stack.cnf.j2",
        bind_address=bind,
        port=mv.port,
        tls_dir=layout.DB_TLS_DIR if remote else "",
        settings=server_settings(server, ctx.sizing.small),
        profile=ctx.sizing.describe(),
    )
    tls = [tls_certificate_step(ctx.private_address, server.service)] if remote else []
    old = f"{server.conf_file.rsplit('/', 1)[0]}/{OLD_CONF_NAME}"
    old_conf = F.PathState(old)
    cleanup = [] if old == server.conf_file else [
        # before zz-…, ours sorted ahead of MySQL's mysqld.cnf, whose bind-address won
        Run(f"older {old} gone", f"{root_only(old)}; rm -f {q(old)}",
            when=lambda c: c[old_conf] is not None, needs=(old_conf,),
            notify=(server.service,)),
    ]  # fmt: skip
    return [
        Apt((server.package,), schedule=Schedule.EARLY),  # installs while anaconda runs
        *(MaskedUnit(unit, notify=(server.service,)) for unit in server.sockets),
        *tls,
        *cleanup,
        File(server.conf_file, conf, notify=(server.service,)),
        Service(server.service),
        *ctx.secret_steps(
            "db_password",
            "db_tuning_password",
            env={"db_password": PASSWORD_ENV, "db_tuning_password": TUNING_PASSWORD_ENV},
        ),
        SecureDatabase(Wanted(accounts)),
    ]


role = Role("mysql", build)
