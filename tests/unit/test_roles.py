"""Roles as plans: OS facts → packages, database state → SQL, vars → rendered files."""

from __future__ import annotations

import json

import pytest

from mlflow_stack import env_requirements, layout, sizing
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.steps import File, PlanContext, Run, Schedule
from mlflow_stack.vars import defaults, validate
from roles import anaconda, demo_files, jupyter, mlflow_server, mysql
from roles.db_passwords import native_password_hash
from tests.unit.test_db_passwords import MYSQL_97_S3CRET
from tests.unit.test_facts import DEBIAN_12, UBUNTU_2204, UBUNTU_2404

DEBIAN = F.OsRelease().parse(DEBIAN_12, 0)
# this machine's sandboxes, as the size fact reads them (recorded)
SANDBOX_SIZE = F.parse_host_size("memory_bytes=25276071936 cpus=2")
T2_MICRO = F.parse_host_size("memory_bytes=1073741824 cpus=1")


def context(os_text: str = DEBIAN_12, size: F.HostSize = SANDBOX_SIZE, **vars) -> RoleContext:
    return RoleContext(
        "h",
        F.OsRelease().parse(os_text, 0),
        validate(vars),
        size,
        {"db_password": "pw-from-host\n", "jupyter_token": "tok-from-host"},
    )


@pytest.mark.parametrize(
    ("os_text", "package", "service"),
    [
        (DEBIAN_12, "mariadb-server", "mariadb.service"),
        (UBUNTU_2204, "mysql-server", "mysql.service"),
        (UBUNTU_2404, "mysql-server", "mysql.service"),
    ],
)
def test_database_flavor_from_os(os_text, package, service):
    fl = layout.db_server(F.OsRelease().parse(os_text, 0))
    assert (fl.package, fl.service) == (package, service)
    steps = mysql.build(context(os_text))
    assert steps[0].packages == (package,)
    masked = [s.unit for s in steps if s.label.startswith("masked ")]
    assert masked == (["mariadb.socket"] if package == "mariadb-server" else [])


def user_row(user, host, password, ssl=""):
    """A `mysql.user` row as STATE_QUERY prints it (MariaDB's native password hash)."""
    stored = native_password_hash(password).encode().hex().upper()
    return f"user\t{user}\t{host}\tmysql_native_password\t{stored}\t{ssl}"


FRESH_MARIADB = "\n".join(
    [
        "user\troot\tlocalhost\tmysql_native_password\t696E76616C6964\t",
        "user\tmariadb.sys\tlocalhost\tmysql_native_password\t\t",
        "user\t\tlocalhost\tmysql_native_password\t\t",
        "db\tinformation_schema\tutf8mb3\tutf8mb3_general_ci",
        "db\tmysql\tutf8mb4\tutf8mb4_general_ci",
        "db\ttest\tlatin1\tlatin1_swedish_ci",
        "dbpriv\t''@'%'\ttest\\_%\tSELECT",
    ]
)


def wanted(password="s3cret", hosts=("localhost", "127.0.0.1")):
    """The tracking server's account alone (the tuning account: its own test)."""
    return mysql.Wanted((mysql.Account("mlflow", password, hosts, ("mlflow",)),))


def test_fresh_server_gets_secured_and_provisioned():
    statements = mysql.plan_sql(mysql.parse_state(FRESH_MARIADB), wanted())
    sql = "\n".join(s for _, s in statements)
    assert "DROP USER ''@'localhost';" in sql
    assert "DROP DATABASE test;" in sql and "DELETE FROM mysql.db WHERE Db='test'" in sql
    assert "CREATE DATABASE `mlflow` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;" in sql
    assert "CREATE DATABASE `optuna` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;" in sql
    assert "CREATE USER 'mlflow'@'localhost' IDENTIFIED BY 's3cret' REQUIRE NONE;" in sql
    assert "GRANT ALL PRIVILEGES ON `mlflow`.* TO 'mlflow'@'127.0.0.1';" in sql
    assert "*.*" not in sql and "WITH GRANT OPTION" not in sql
    assert statements[-1] == ("flush privileges", "FLUSH PRIVILEGES;")


def converged_state(password="s3cret", hosts=("localhost", "127.0.0.1"), extra=()):
    rows = [
        "user\troot\tlocalhost\tmysql_native_password\t696E76616C6964\t",
        "db\tmlflow\tutf8mb4\tutf8mb4_bin",
        "db\toptuna\tutf8mb4\tutf8mb4_bin",
    ]
    for host in hosts:
        rows.append(user_row("mlflow", host, password))
        rows += [f"dbpriv\t'mlflow'@'{host}'\tmlflow\t{p}" for p in mysql.REQUIRED_PRIVILEGES]
    return mysql.parse_state("\n".join([*rows, *extra]))


def test_converged_server_needs_no_sql():
    assert mysql.plan_sql(converged_state(), wanted()) == []


def test_new_password_is_applied_with_alter_user():
    statements = mysql.plan_sql(converged_state("old"), wanted("new"))
    assert [w for w, _ in statements][:2] == [
        "set password of mlflow@localhost",
        "set password of mlflow@127.0.0.1",
    ]
    assert "ALTER USER 'mlflow'@'localhost' IDENTIFIED BY 'new';" in statements[0][1]


def test_original_global_grant_is_revoked():
    state = converged_state(extra=["globalpriv\t'mlflow'@'localhost'\tSUPER"])
    whats = [w for w, _ in mysql.plan_sql(state, wanted())]
    assert whats == ["grant mlflow@localhost rights on mlflow only", "flush privileges"]


def test_latin1_database_is_switched_and_stale_hosts_dropped():
    state = converged_state(hosts=("localhost", "127.0.0.1", "10.0.0.9"))
    state.databases["mlflow"] = ("latin1", "latin1_swedish_ci")
    whats = [w for w, _ in mysql.plan_sql(state, wanted())]
    assert "drop mlflow@10.0.0.9" in whats and "set mlflow to utf8mb4" in whats


def test_password_quotes_are_escaped():
    sql = "".join(s for _, s in mysql.plan_sql(mysql.DbState(), wanted("it's\\x")))
    assert "BY 'it\\'s\\\\x'" in sql


def test_accounts_keep_the_servers_default_plugin():
    """No deprecated plugin asked for (MySQL 9 has no mysql_native_password at all)."""
    sql = "".join(s for _, s in mysql.plan_sql(mysql.DbState(), wanted("pw", ("localhost",))))
    assert "IDENTIFIED BY 'pw'" in sql and "WITH" not in sql


def test_mysql_caching_sha2_account_with_our_password_needs_no_sql():
    """A real MySQL 9.7 row (CREATE USER … IDENTIFIED BY 'S3cret-pw', caching_sha2_password):
    no ALTER USER with the same password, one with another."""
    row = f"user\tmlflow\tlocalhost\tcaching_sha2_password\t{MYSQL_97_S3CRET}\t"
    grants = [f"dbpriv\t'mlflow'@'localhost'\tmlflow\t{p}" for p in mysql.REQUIRED_PRIVILEGES]
    dbs = ["db\tmlflow\tutf8mb4\tutf8mb4_bin", "db\toptuna\tutf8mb4\tutf8mb4_bin"]
    state = mysql.parse_state("\n".join([row, *grants, *dbs]))
    assert mysql.plan_sql(state, wanted("S3cret-pw", ("localhost",))) == []
    whats = [w for w, _ in mysql.plan_sql(state, wanted("another-pw", ("localhost",)))]
    assert whats == ["set password of mlflow@localhost", "flush privileges"]


def test_two_accounts_each_with_rights_on_its_own_database_only():
    """The tracking server's account: `mlflow` from this host; the tuning account: `optuna`,
    also from the workers' addresses. Neither has rights on the other's database."""
    w = mysql.Wanted(
        (
            mysql.Account("mlflow", "a" * 16, ("localhost",), ("mlflow",)),
            mysql.Account("optuna", "b" * 16, ("localhost", "10.0.0.9"), ("optuna",)),
        ),
    )
    sql = "\n".join(s for _, s in mysql.plan_sql(mysql.DbState(), w))
    assert "GRANT ALL PRIVILEGES ON `mlflow`.* TO 'mlflow'@'localhost';" in sql
    assert "GRANT ALL PRIVILEGES ON `optuna`.* TO 'optuna'@'10.0.0.9';" in sql
    assert "TO 'mlflow'@'10.0.0.9'" not in sql and "`optuna`.* TO 'mlflow'" not in sql
    assert "`mlflow`.* TO 'optuna'" not in sql
    # an older layout's grant of both databases to the mlflow account is taken back
    state = mysql.parse_state(
        user_row("mlflow", "localhost", "a" * 16) + "\n"
        + "\n".join(f"dbpriv\t'mlflow'@'localhost'\t{db}\t{p}"
                    for db in ("mlflow", "optuna") for p in mysql.REQUIRED_PRIVILEGES)
    )  # fmt: skip
    whats = [what for what, _ in mysql.plan_sql(state, w)]
    assert "grant mlflow@localhost rights on mlflow only" in whats


def test_mysql_role_keeps_the_tuning_password_apart():
    steps = mysql.build(context(mysql={"allow_from": ["10.0.0.9"]}))
    (db,) = [s for s in steps if isinstance(s, mysql.SecureDatabase)]
    by_user = {a.user: a for a in db.wanted.accounts}
    assert by_user["mlflow"].hosts == ("localhost", "127.0.0.1")
    assert by_user["optuna"].hosts == ("localhost", "127.0.0.1", "10.0.0.9")
    assert by_user["mlflow"].password != by_user["optuna"].password
    assert "secret db_tuning_password" in [s.label for s in steps]


def test_sql_goes_on_stdin_only():
    step = mysql.SecureDatabase(wanted())
    change = step.plan(PlanContext({mysql.state_fact().key: F.ShellResult(0, FRESH_MARIADB)}))
    (cmd,) = change.commands
    assert cmd.script == "mysql --batch" and "s3cret" in cmd.stdin
    assert "s3cret" not in change.summary and change.secret


def test_secrets_come_from_host_then_env(monkeypatch):
    ctx = context()
    assert ctx.secret("db_password", env="MLFLOW_DB_PASSWORD").reveal() == "pw-from-host"
    monkeypatch.setenv("MLFLOW_DB_PASSWORD", "from-env-var")
    assert context().secret("db_password", env="MLFLOW_DB_PASSWORD").reveal() == "from-env-var"
    fresh = RoleContext("h", DEBIAN, defaults(), SANDBOX_SIZE)
    assert len(fresh.secret("db_password").reveal()) >= 30


def find(steps, name):
    return next(s for s in steps if s.label == name)


def test_mlflow_server_env_file_unit_and_schema():
    steps = mlflow_server.build(context())
    env = find(steps, "file /etc/mlflow/mlflow.env")
    assert (env.mode, env.owner, env.group) == (0o640, "root", "mlflow") and env.secret
    assert "MLFLOW_BACKEND_STORE_URI=mysql+pymysql://mlflow:pw-from-host@127.0.0.1:3306/mlflow" in (
        env.content
    )
    unit = find(steps, "file /etc/systemd/system/mlflow-server.service").content
    assert "pw-from-host" not in unit and "EnvironmentFile=/etc/mlflow/mlflow.env" in unit
    assert (
        "--host 127.0.0.1 --port 5000 --workers 1 --artifacts-destination /var/lib/mlflow/ar"
        in (unit)
    )
    assert "User=mlflow" in unit and "ProtectSystem=strict" in unit and "Restart=on-failure" in unit
    assert "After=network-online.target mariadb.service" in unit and "basic-auth" not in unit
    assert "ExecStart=/opt/anaconda/envs/mlflow/bin/python /opt/mlflow/server.py --host" in unit
    launcher = find(steps, f"file {layout.MLFLOW_LAUNCHER}")
    assert launcher.notify == ("mlflow-server.service",) and "uvicorn.run(" in launcher.content
    # the migration backs up first and puts the backup back if it fails (stackdata.py upgrade,
    # as root: the account's parts as the account); tests/unit/test_upgrade.py has the rest
    schema = find(steps, "MLflow schema and env: back up, migrate, switch")
    assert isinstance(schema, Run) and schema.user is None
    fact, ready = schema.needs
    assert fact.live  # read again once the run has started or created the database
    none = F.ShellResult(1, "")

    def plans(version: str) -> str:
        change = schema.plan(PlanContext({fact.key: F.ShellResult(0, version), ready.key: none}))
        return change.commands[0].script if change else ""

    assert not plans("dc11669786a5\n")
    assert "stackdata.py upgrade --env /opt/anaconda/envs/mlflow" in plans("4465047574b1\n")
    # an empty database: loaded from the snapshot (MariaDB) or created by the server's first start
    assert schema.plan(PlanContext({fact.key: F.ShellResult(1, ""), ready.key: none})) is None


def snapshot_step(steps):
    return next((s for s in steps if s.label.startswith("tracking schema ")), None)


def test_empty_mariadb_database_gets_the_schema_snapshot_before_the_server_starts():
    steps = mlflow_server.build(context())
    load = snapshot_step(steps)
    assert isinstance(load, Run) and load.user is None and load.notify == ("mlflow-server.service",)
    names = [s.label for s in steps]
    assert names.index(load.label) < names.index("service mlflow-server.service")
    fact = load.needs[0]
    assert fact.live  # the mysql role creates the database in the same run

    def plans(rc: int, tables: str) -> bool:
        return load.plan(PlanContext({fact.key: F.ShellResult(rc, tables)})) is not None

    assert plans(0, "")  # empty database
    assert plans(0, f"alembic_version\n{mlflow_server.LOADING}\n")  # a killed load's leftovers
    assert plans(1, "")  # not readable yet: the load reports why
    assert not plans(0, "alembic_version\nexperiments\nruns\n")
    # MySQL (Ubuntu) and SQLite: the server's first start still creates the schema
    assert snapshot_step(mlflow_server.build(context(UBUNTU_2204))) is None
    assert snapshot_step(mlflow_server.build(context(mlflow={"backend": "sqlite"}))) is None


def test_schema_snapshot_is_the_pinned_head_and_marks_its_load_complete_last():
    text = mlflow_server.SNAPSHOT.read_text()
    assert text.count("CREATE TABLE") == 65 and "alembic_version` VALUES" not in text
    assert mlflow_server.SCHEMA_HEAD in text.splitlines()[0]
    sql = mlflow_server.snapshot_sql("CREATE TABLE t (x INT);").splitlines()
    marker = mlflow_server.LOADING
    assert sql[:2] == ["SET FOREIGN_KEY_CHECKS=0;", f"CREATE TABLE {marker} (loading INT);"]
    assert sql[-2:] == [
        f"INSERT INTO alembic_version VALUES ('{mlflow_server.SCHEMA_HEAD}');",
        f"DROP TABLE {marker};",
    ]


FAKE_MYSQL = """#!/bin/sh
# mysql stand-in: `-N -B -e QUERY` lists $TABLES; any other call is logged with its stdin.
case "$*" in -N*) printf "%s" "$TABLES"; exit 0;; esac
echo "mysql $*" >> "$LOG"; [ -t 0 ] || cat >> "$LOG"
"""


@pytest.mark.parametrize(
    ("tables", "rc", "logged"),
    [
        ("", 0, ["mysql --batch mlflow", "SQL"]),
        (f"alembic_version\n{mlflow_server.LOADING}\n", 0, ["DROP DATABASE mlflow", "SQL"]),
        ("alembic_version\nruns\n", 1, []),  # someone's tables: left alone
    ],
)
def test_snapshot_load_script(tmp_path, tables, rc, logged):
    import subprocess

    (tmp_path / "mysql").write_text(FAKE_MYSQL)
    (tmp_path / "mysql").chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TABLES": tables, "LOG": str(log)}
    proc = subprocess.run(
        ["sh", "-c", mlflow_server.load_snapshot_script()],
        input="SQL\n",
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == rc, proc.stderr
    text = log.read_text() if log.exists() else ""
    assert all(part in text for part in logged) and bool(text) == bool(logged)
    if rc:
        assert "has tables but no MLflow schema version" in proc.stderr


def test_schema_head_is_the_installed_mlflows():
    utils = pytest.importorskip("mlflow.store.db.utils")
    assert utils._get_latest_schema_revision() == mlflow_server.SCHEMA_HEAD


def test_password_is_url_quoted_in_the_uri():
    assert layout.tracking_db_uri("mysql", "a/b@c:d", 3306) == (
        "mysql+pymysql://mlflow:a%2Fb%40c%3Ad@127.0.0.1:3306/mlflow"
    )
    assert layout.tracking_db_uri("sqlite", "", 0) == "sqlite:////var/lib/mlflow/mlflow.db"


def test_public_mlflow_turns_on_auth_behind_the_proxy():
    ctx = context(mlflow={"public": True})
    ctx.address = "203.0.113.10"
    steps = mlflow_server.build(ctx)
    unit = find(steps, "file /etc/systemd/system/mlflow-server.service").content
    # behind the proxy: loopback only, the site's Host headers and origin, basic auth
    assert "--host 127.0.0.1 " in unit and "--app-name basic-auth" in unit
    assert "--allowed-hosts 203.0.113.10,203.0.113.10:443,localhost,localhost:*,127.0.0.1," in unit
    assert "--cors-allowed-origins https://203.0.113.10" in unit
    assert "IPAddressAllow=localhost" in unit
    assert "EnvironmentFile=-/etc/mlflow/admin.env" in unit
    env = find(steps, "file /etc/mlflow/mlflow.env").content
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in env
    ini = find(steps, "file /etc/mlflow/basic_auth.ini")
    assert (ini.mode, ini.owner, ini.group) == (0o640, "root", "mlflow")
    assert "admin_password" not in ini.content and "default_permission = READ" in ini.content
    admin_env = find(steps, "file /etc/mlflow/admin.env")
    assert admin_env.secret and not admin_env.notify  # used at the admin's creation only
    client = find(steps, "file /etc/mlflow-stack/mlflow-client.env")
    assert (client.mode, client.owner) == (0o600, "root") and client.secret
    assert "MLFLOW_TRACKING_USERNAME=demo" in client.content


def test_sqlite_backend_needs_no_database_password():
    steps = mlflow_server.build(context(mlflow={"backend": "sqlite"}))
    unit = find(steps, "file /etc/systemd/system/mlflow-server.service").content
    assert "mariadb" not in unit
    assert (
        "sqlite:////var/lib/mlflow/mlflow.db" in find(steps, "file /etc/mlflow/mlflow.env").content
    )


def test_anaconda_uv_plan():
    steps = anaconda.build(context())
    sync = find(steps, "env mlflow")
    stamp, exists = sync.needs
    text = env_requirements.requirements("mlflow")
    current = F.ShellResult(0, env_requirements.digest(text) + "\n")
    assert sync.plan(PlanContext({stamp.key: current, exists.key: None})) is None
    change = sync.plan(PlanContext({stamp.key: F.ShellResult(1, ""), exists.key: None}))
    script = change.commands[0].script
    assert "uv pip sync -q --require-hashes" in script
    assert "UV_PYTHON_DOWNLOADS=never" in script and sync.notify == ("mlflow-server.service",)
    assert "\nmlflow==3.17.2 \\\n" in text and "--hash=sha256:" in text
    uv = find(steps, "uv 0.13.9")
    ufact = uv.needs[0]
    assert uv.plan(PlanContext({ufact.key: F.ShellResult(0, "uv 0.13.9 (x86_64)\n")})) is None
    assert (
        "sha256sum -c"
        in uv.plan(PlanContext({ufact.key: F.ShellResult(127, "")})).commands[0].script
    )


def test_anaconda_conda_plan():
    ctx = context(python={"manager": "conda", "miniforge_sha256": {"x86_64": "ab" * 32}})
    steps = anaconda.build(ctx)
    install = find(steps, "Miniforge")
    conda = install.needs[0]
    script = install.plan(PlanContext({conda.key: None})).commands[0].script
    assert "x86_64) sha=" + "ab" * 32 in script and "-b -u -p /opt/anaconda" in script
    assert install.plan(PlanContext({conda.key: F.PathInfo("file", 0o755, "root", "root", 1)})) is (
        None
    )
    sync = find(steps, "env demo")
    stamp, envs = sync.needs
    listing = json.dumps({"envs": ["/opt/anaconda", "/opt/anaconda/envs/demo"]})
    facts = {stamp.key: F.ShellResult(1, ""), envs.key: F.ShellResult(0, listing)}
    assert (
        "conda env update --prune -p /opt/anaconda/envs/demo"
        in sync.plan(PlanContext(facts)).commands[0].script
    )
    facts[envs.key] = F.ShellResult(0, json.dumps({"envs": ["/opt/anaconda"]}))
    assert (
        "conda env create -p /opt/anaconda/envs/demo"
        in sync.plan(PlanContext(facts)).commands[0].script
    )


def test_parse_conda_env_list():
    assert anaconda.parse_conda_envs('{"envs": ["/opt/anaconda", "/x"]}') == ("/opt/anaconda", "/x")
    assert anaconda.parse_conda_envs("bash: conda: command not found") == ()


def test_jupyter_token_and_password_configs():
    steps = jupyter.build(context())
    config = find(steps, "file /etc/jupyter-demo/jupyter_server_config.json")
    settings = json.loads(config.content)
    assert settings["IdentityProvider"] == {"token": "tok-from-host"}
    assert settings["LabApp"]["news_url"] is None  # nothing calls out unasked
    assert settings["ServerApp"]["terminado_settings"] == {"shell_command": ["/bin/bash"]}
    assert (config.mode, config.owner, config.group) == (0o640, "root", "demo")  # demo reads it
    unit = find(steps, "file /etc/systemd/system/jupyter.service").content
    assert "tok-from-host" not in unit and "User=demo" in unit
    assert "--ServerApp.ip=127.0.0.1 --ServerApp.port=8888 " in unit
    assert "--ServerApp.root_dir=/var/lib/demo/workspace" in unit
    assert "Environment=MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in unit


def test_jupyter_password_hash_is_kept_while_it_matches():
    hashed = jupyter.password_hash("pw")
    assert jupyter.hash_matches(hashed, "pw") and not jupyter.hash_matches(hashed, "other")
    step = jupyter.PasswordConfig("pw")
    existing = jupyter.server_config("password", "", hashed)
    path_fact, config_fact = step.facts()
    import hashlib

    info = F.PathInfo(
        "file", 0o640, "root", "demo", len(existing), hashlib.sha256(existing.encode()).hexdigest()
    )
    ctx = PlanContext({path_fact.key: info, config_fact.key: F.ShellResult(0, existing)})
    assert step.plan(ctx) is None  # same password: the salted hash is not regenerated
    other = jupyter.PasswordConfig("new")
    change = other.plan(ctx)
    assert change is not None and jupyter.hash_matches(
        jupyter.existing_hash(change.new_text), "new"
    )
    assert other.plan(ctx).new_text != change.new_text  # planning is pure: a new salt each time


def test_every_role_renders_without_undefined_variables():
    import roles

    ctx = context()
    for name in layout.ROLES:
        steps = roles.get(name).build(ctx)
        assert steps and all(s.label for s in steps)
        assert all(isinstance(s.content, (str, bytes)) for s in steps if isinstance(s, File))


def test_every_service_unit_is_hardened_and_restarts():
    from mlflow_stack.actions.serve import ServeRequest, serve_steps

    units = {
        "mlflow": find(
            mlflow_server.build(context()), "file /etc/systemd/system/mlflow-server.service"
        ).content,
        "jupyter": find(
            jupyter.build(context()), "file /etc/systemd/system/jupyter.service"
        ).content,
        "model": next(
            s
            for s in serve_steps(ServeRequest("w", "r", 54321, 1), "models:/m-1", layout.Layout())
            if s.label.endswith("mlflow-model@.service")
        ).content,
    }
    units["warm"] = find(
        demo_files.build(context()), f"file /etc/systemd/system/{layout.WARM_UNIT}"
    ).content
    server = mlflow_server.build(context())
    units["recorder"] = find(server, f"file /etc/systemd/system/{layout.RECORDER_UNIT}").content
    for name, unit in units.items():
        for line in (
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "RestrictNamespaces=yes",
            "ProtectProc=invisible",
            "ProtectKernelLogs=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "LockPersonality=yes",
            "RestrictRealtime=yes",
            "IPAddressDeny=",
        ):
            assert line in unit, f"{name}: {line!r} missing"
        assert "User=root" not in unit and "\nUser=" in unit
        # writable: only the areas systemd makes for the unit, never a path of root's
        assert "ReadWritePaths=" not in unit, name
    for name in ("mlflow", "jupyter", "model"):
        assert "Restart=on-failure" in units[name]
    # a service that never talks beyond the host gets no other address at all
    assert "IPAddressDeny=any\nIPAddressAllow=localhost" in units["mlflow"]
    assert "IPAddressDeny=any\nIPAddressAllow=localhost" in units["model"]


def test_provisioning_and_the_demo_pin_the_same_data():
    from demo_wine import data
    from mlflow_stack.vars import WINE_SHA256

    assert data.SHA256 == WINE_SHA256 == data.sha256_hex(data.BUNDLED.read_bytes())
    shipped = find(demo_files.build(context()), "data (shipped copy)")
    assert shipped.path == layout.DEMO_DATA and shipped.data == data.BUNDLED.read_bytes()


def test_the_warm_runner_is_the_demo_users_and_can_be_turned_off():
    steps = demo_files.build(context(demo={"data_file": None}))
    unit = find(steps, f"file /etc/systemd/system/{layout.WARM_UNIT}")
    assert unit.notify == (layout.WARM_UNIT,) and unit.unit_file
    for line in ("User=demo", "Restart=always", "NoNewPrivileges=yes"):
        assert line in unit.content
    assert f"Requires={layout.WARM_SOCKET_UNIT}" in unit.content
    assert f"-m demo_wine.warm serve {layout.WARM_SOCKET}\n" in unit.content  # no idle exit
    socket = find(steps, f"file /etc/systemd/system/{layout.WARM_SOCKET_UNIT}").content
    for line in (f"ListenStream={layout.WARM_SOCKET}", "SocketUser=demo", "SocketMode=0600"):
        assert line in socket
    code = [
        s
        for s in steps
        if isinstance(s, File)
        and s.path.startswith(layout.DEMO_CODE)
        and s.path != layout.DEMO_DATA
    ]
    assert code and all(s.notify == (layout.WARM_UNIT,) for s in code)  # new code: restart
    service = find(steps, f"service {layout.WARM_UNIT}")
    assert service.enabled and service.running

    assert find(steps, f"service {layout.WARM_SOCKET_UNIT}").running

    off = demo_files.build(context(demo={"warm_runner": False}))
    for name in (layout.WARM_UNIT, layout.WARM_SOCKET_UNIT):
        service = find(off, f"service {name}")
        assert not service.enabled and service.running is False
    assert all(layout.WARM_UNIT not in s.notify for s in off)


def test_on_the_small_profile_the_warm_runner_starts_on_demand_and_exits_when_idle():
    steps = demo_files.build(context(size=T2_MICRO))
    unit = find(steps, f"file /etc/systemd/system/{layout.WARM_UNIT}")
    assert f"--idle {sizing.WARM_IDLE_S}" in unit.content and "Restart=on-failure" in unit.content
    assert "MALLOC_ARENA_MAX=2" in unit.content
    assert not unit.notify  # a running one is stopped instead (the next run starts it)
    assert all(layout.WARM_UNIT not in s.notify for s in steps)
    service = find(steps, f"service {layout.WARM_UNIT}")
    assert not service.enabled and service.running is None  # its socket starts it
    socket = find(steps, f"service {layout.WARM_SOCKET_UNIT}")
    assert socket.enabled and socket.running
    # asked for explicitly, it runs always on a small host too
    always = demo_files.build(context(size=T2_MICRO, demo={"warm_runner": True}))
    assert find(always, f"service {layout.WARM_UNIT}").running


def test_a_runner_from_before_its_socket_unit_lets_go_of_the_socket():
    """Older hosts: the runner bound the socket itself (no socket unit). It is stopped and
    its socket file removed before the socket unit binds the path."""
    steps = demo_files.build(context())
    step = find(steps, "warm runner stopped (it starts again on demand)")
    active = F.UnitInfo("loaded", "active", "running", "enabled", False)
    absent = F.UnitInfo("not-found", "inactive", "dead", "", False)
    facts = {F.Unit(layout.WARM_UNIT).key: active, F.Unit(layout.WARM_SOCKET_UNIT).key: absent}
    (cmd,) = step.plan(PlanContext(facts)).commands
    assert cmd.script == f"systemctl stop {layout.WARM_UNIT} && rm -f {layout.WARM_SOCKET}"
    facts[F.Unit(layout.WARM_SOCKET_UNIT).key] = active
    assert step.plan(PlanContext(facts)) is None  # today's layout: nothing to do


def test_mysql_settings_by_server_and_profile():
    """MySQL: no binary log (MLflow's trigger migration, error 1419) and no X protocol, on
    every profile; the small profile's buffers and limits for the engine it is."""

    def conf(size, server):
        steps = mysql.build(context(UBUNTU_2404, size=size, mysql={"server": server}))
        return next(s for s in steps if isinstance(s, File) and s.path.endswith(".cnf")).content

    big, small = conf(SANDBOX_SIZE, "mysql"), conf(T2_MICRO, "mysql")
    assert "skip-log-bin\n" in big and "mysqlx = OFF" in big
    assert "innodb_buffer_pool_size" not in big
    for line in (
        "innodb_buffer_pool_size = 64M",
        "max_connections = 50",
        "temptable_max_ram = 32M",
        "performance_schema = OFF",
        "skip-log-bin",
    ):
        assert line in small
    maria = conf(T2_MICRO, "mariadb")
    assert "aria_pagecache_buffer_size = 8M" in maria and "temptable" not in maria
    assert "skip-log-bin" not in conf(SANDBOX_SIZE, "mariadb")


def test_the_mysql_config_is_read_after_the_packages_own():
    """MySQL's mysqld.cnf sets bind-address: ours sorts after it; an older 60-… is removed."""
    steps = mysql.build(context(UBUNTU_2404))
    conf = next(s for s in steps if isinstance(s, File) and s.path.endswith(".cnf"))
    assert (
        conf.path
        == "/etc/mysql/mysql.conf.d/zz-mlflow-stack.cnf"
        > "/etc/mysql/mysql.conf.d/mysqld.cnf"
    )
    old = "/etc/mysql/mysql.conf.d/60-mlflow-stack.cnf"
    cleanup = find(steps, f"older {old} gone")
    present = F.PathInfo("file", 0o644, "root", "root", 10)
    assert "rm -f" in cleanup.plan(PlanContext({F.PathState(old).key: present})).commands[0].script
    assert cleanup.plan(PlanContext({F.PathState(old).key: None})) is None
    assert not [s for s in mysql.build(context()) if s.label.startswith("older ")]


def test_no_mlflow_process_on_the_host_sends_usage_data():
    """MLflow 3 sends telemetry by default; every process of the stack turns it off."""
    from mlflow_stack.actions.remote import demo_command
    from mlflow_stack.actions.serve import ServeRequest, serve_steps

    ctx = context()
    texts = {
        "mlflow.env": find(mlflow_server.build(ctx), "file /etc/mlflow/mlflow.env").content,
        "jupyter": find(jupyter.build(ctx), "file /etc/systemd/system/jupyter.service").content,
        "warm": find(demo_files.build(ctx), f"file /etc/systemd/system/{layout.WARM_UNIT}").content,
        "setenv": find(demo_files.build(ctx), "file /opt/demo/setenv.sh").content,
        "model.env": next(
            s
            for s in serve_steps(ServeRequest("w", "r", 54321, 1), "models:/m-1", layout.Layout())
            if s.label.endswith(".env")
        ).content,
        "actions": demo_command(layout.Layout(), ["-m", "demo_wine.train"]),
    }
    for name, text in texts.items():
        assert "MLFLOW_DISABLE_TELEMETRY=true" in text, name


def test_mlflow_server_bytecode_compiles_in_the_background_into_roots_cache():
    steps = anaconda.build(context())
    names = [s.label for s in steps]
    warm = find(steps, "bytecode of the MLflow server")
    assert names.index(warm.label) == names.index("env mlflow") + 1
    assert warm.schedule is Schedule.BACKGROUND and warm.id == mlflow_server.WARM_ID
    # root writes the cache and the server only reads it: nobody else can plant bytecode there
    assert warm.user is None
    assert f"PYTHONPYCACHEPREFIX={layout.MLFLOW_PYCACHE} " in warm.script
    assert layout.MLFLOW_PYCACHE.startswith(layout.STACK_CACHE + "/")
    assert "mlflow.server.fastapi_app" in warm.script
    cache = warm.needs[0]
    info = F.PathInfo("directory", 0o755, "root", "root", 0)
    assert warm.plan(PlanContext({cache.key: None})) is not None
    assert warm.plan(PlanContext({cache.key: info})) is None
    synced = {anaconda.env_step_id("mlflow")}
    assert warm.plan(PlanContext({cache.key: info}, changed=synced)) is not None
    assert warm.plan(PlanContext({cache.key: info}, changed={"env mlflow"})) is None  # a label
    unit = find(mlflow_server.build(context()), "file /etc/systemd/system/mlflow-server.service")
    assert f"Environment=PYTHONPYCACHEPREFIX={layout.MLFLOW_PYCACHE}\n" in unit.content


def test_no_root_step_writes_or_runs_code_where_a_service_account_can_write():
    """Every path root writes (files, directories) is outside the service accounts' areas, and
    the accounts' own areas are only ever touched as the account (or created, as a whole)."""
    areas = (layout.MLFLOW_STATE + "/", layout.DEMO_STATE + "/", layout.MODELS_CACHE + "/")
    ctx = context()
    import roles

    for name in layout.ROLES:
        for step in roles.get(name).build(ctx):
            path = getattr(step, "path", "")
            if path and getattr(step, "user", None) is None:
                assert not path.startswith(areas), f"{name}: root writes {path}"
            if isinstance(step, Run) and step.user is None:
                script = step.script if isinstance(step.script, str) else ""
                for area in areas:
                    assert f"PYTHONPYCACHEPREFIX={area}" not in script, f"{name}: {step.label}"


def test_a_server_with_workers_opens_its_private_address_to_them_alone_with_tls():
    ctx = context()
    ctx.private_address, ctx.workers = "10.77.0.3", ("10.77.0.4", "10.77.0.5")
    steps = mysql.build(ctx)
    conf = find(steps, f"file {layout.MARIADB.conf_file}").content
    assert "bind-address = 127.0.0.1,10.77.0.3\n" in conf  # never 0.0.0.0
    assert f"ssl_ca = {layout.DB_CA}\n" in conf
    tls = find(steps, "database TLS certificate")
    fact = tls.needs[0]
    made = tls.plan(PlanContext({fact.key: F.ShellResult(1, "")}))
    assert (
        "subjectAltName=IP:%s" in made.commands[0].script and "10.77.0.3" in made.commands[0].script
    )
    current = F.ShellResult(0, "X509v3 Subject Alternative Name:\n    IP Address:10.77.0.3\n")
    assert tls.plan(PlanContext({fact.key: current})) is None
    (db,) = [s for s in steps if isinstance(s, mysql.SecureDatabase)]
    sql = "\n".join(stmt for _, stmt in mysql.plan_sql(mysql.DbState(), db.wanted))
    for worker in ctx.workers:
        assert f"CREATE USER 'optuna'@'{worker}' IDENTIFIED BY " in sql
        assert f"@'{worker}' IDENTIFIED BY '{db.wanted.accounts[1].password}' REQUIRE SSL;" in sql
        assert f"`optuna`.* TO 'optuna'@'{worker}'" in sql and f"'mlflow'@'{worker}'" not in sql
    unit = find(mlflow_server.build(ctx), "file /etc/systemd/system/mlflow-server.service").content
    assert "--host 127.0.0.1 --host 10.77.0.3 --port 5000" in unit
    assert "--allowed-hosts" not in unit  # MLflow's default: loopback and private ranges
    assert "IPAddressAllow=localhost 10.77.0.4 10.77.0.5\n" in unit


def test_a_server_without_workers_stays_on_loopback():
    steps = mysql.build(context())
    assert "bind-address = 127.0.0.1\n" in find(steps, f"file {layout.MARIADB.conf_file}").content
    assert not [s for s in steps if s.label == "database TLS certificate"]
    unit = find(mlflow_server.build(context()), "file /etc/systemd/system/mlflow-server.service")
    assert "--host 127.0.0.1 --port" in unit.content


def test_requiring_tls_of_an_existing_account_is_planned():
    w = mysql.Wanted(
        (mysql.Account("optuna", "p" * 16, ("10.0.0.9",), ("optuna",), ("10.0.0.9",)),),
    )
    rows = (
        user_row("optuna", "10.0.0.9", "p" * 16)
        + "\n"
        + "\n".join(f"dbpriv\t'optuna'@'10.0.0.9'\toptuna\t{p}" for p in mysql.REQUIRED_PRIVILEGES)
    )
    dbs = "db\tmlflow\tutf8mb4\tutf8mb4_bin\ndb\toptuna\tutf8mb4\tutf8mb4_bin\n"
    whats = [what for what, _ in mysql.plan_sql(mysql.parse_state(dbs + rows), w)]
    assert whats == ["require TLS of optuna@10.0.0.9", "flush privileges"]
    rows = rows.replace(
        user_row("optuna", "10.0.0.9", "p" * 16), user_row("optuna", "10.0.0.9", "p" * 16, "ANY"), 1
    )
    assert mysql.plan_sql(mysql.parse_state(dbs + rows), w) == []
