"""The data of an mlflow-stack host: backup stream, restore, safe upgrade and gc.

Installed as /opt/mlflow/stackdata.py and run with the `mlflow` env's Python:

    stackdata.py backup [--with-secrets] [--level N]    as root: the framed stream on stdout
    stackdata.py inspect                                as root: what restore must know, JSON
    stackdata.py restore-begin | restore-db | restore-auth | restore-tree NAME |
                 restore-secrets | restore-finish       as root: one step of a restore each
    stackdata.py upgrade --env DIR [--next DIR]         as root: back up, migrate, switch envs
    stackdata.py auth-admin --check | --set             as root: admin's password = the secret
    stackdata.py gc --older-than 30d --tracking-uri U   as the mlflow account (its unit)

Root reads the accounts' data only through the accounts themselves (`runuser`), and anything
written into an account's area is written by that account; secrets travel on stdin. Backup,
migration and gc exclude each other with one lock: MySQL's named lock `mlflow_stack_schema`
(the one `db_upgrade.py` takes), or a file lock beside the SQLite database.

Standard library only (the env's MLflow is run in subprocesses when needed), Python >= 3.10.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time

# --- the host's layout (tests/unit/test_stackdata.py compares it with mlflow_stack.layout) --

MLFLOW_USER = "mlflow"
DEMO_USER = "demo"
MLFLOW_STATE = "/var/lib/mlflow"
ARTIFACTS = f"{MLFLOW_STATE}/artifacts"
SQLITE_DB = f"{MLFLOW_STATE}/mlflow.db"
AUTH_DB = f"{MLFLOW_STATE}/basic_auth.db"
DEMO_STATE = "/var/lib/demo"
WORKSPACE = f"{DEMO_STATE}/workspace"
ENV_FILE = "/etc/mlflow/mlflow.env"
AUTH_CONFIG = "/etc/mlflow/basic_auth.ini"
DB_UPGRADE = "/opt/mlflow/db_upgrade.py"
SECRETS_DIR = "/etc/mlflow-stack/secrets"
ADMIN_SECRET = f"{SECRETS_DIR}/mlflow_admin_password"
TUNING_SECRET = f"{SECRETS_DIR}/db_tuning_password"
ADMIN_USER = "admin"
PYCACHE = "/var/cache/mlflow-stack/pycache-mlflow"
UPGRADE_BACKUPS = "/var/backups/mlflow-stack"
RESTORE_STATE = "/var/lib/mlflow-stack/restore-units.json"
MLFLOW_UNIT = "mlflow-server.service"
RECORDER_UNITS = ("mlflow-recorder.socket", "mlflow-recorder.service")
GC_UNITS = ("mlflow-gc.timer", "mlflow-gc.service")
JUPYTER_UNIT = "jupyter.service"
WARM_UNIT = "demo-wine-warm.service"
# What writes MLflow's, Optuna's or the workspace's data, in the order it is stopped.
WRITERS = (*GC_UNITS, *RECORDER_UNITS, MLFLOW_UNIT, WARM_UNIT, JUPYTER_UNIT)
DATABASES = ("mlflow", "optuna")
TUNING_DB_USER = "optuna"
CHARSET, COLLATION = "utf8mb4", "utf8mb4_bin"
LOCK_NAME = "mlflow_stack_schema"
# The trees a backup holds: part name -> (directory, the account that owns and writes it)
TREES = {"artifacts": (ARTIFACTS, MLFLOW_USER), "workspace": (WORKSPACE, DEMO_USER)}
# MariaDB's dumps start with this line, which MySQL's client (and older MariaDB ones) refuse.
SANDBOX_LINE = re.compile(rb"^/\*M!999999\\- enable the sandbox mode \*/\n")
FORMAT = 1
CHUNK = 1 << 20


class Failure(Exception):
    """One line for the controller: what failed and what to do."""


# --- small helpers ---------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(argv: list[str], *, stdin: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True)
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise Failure(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {tail[0]}")
    return proc.stdout.decode(errors="replace")


def as_user(user: str, argv: list[str]) -> list[str]:
    """`argv` run as `user` (from root), in / with that account's umask for its area."""
    return ["runuser", "-u", user, "--", "sh", "-c", 'umask 027; exec "$@"', "sh", *argv]


def python_as(user: str, python: str, code: str, *args: str, stdin: bytes | None = None) -> dict:
    """Run a Python snippet as `user`; it prints one JSON object last."""
    out = run(as_user(user, [python, "-I", "-c", code, *args]), stdin=stdin)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def backend() -> str:
    """`mysql` or `sqlite`, from the server's env file (root reads it; it is never printed)."""
    with open(ENV_FILE) as handle:
        for line in handle:
            key, _, value = line.strip().partition("=")
            if key == "MLFLOW_BACKEND_STORE_URI":
                return "sqlite" if value.startswith("sqlite") else "mysql"
    raise Failure(f"{ENV_FILE}: no MLFLOW_BACKEND_STORE_URI; run invoke provision")


def exists(path: str) -> bool:
    return os.path.lexists(path)


def unit_active(unit: str) -> bool:
    return subprocess.run(["systemctl", "-q", "is-active", unit]).returncode == 0


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")  # noqa: UP017 (3.10)


def have_zstd() -> bool:
    return shutil.which("zstd") is not None


# --- MySQL/MariaDB as root (the local socket) ----------------------------------------------


def mariadb_tools() -> bool:
    """MariaDB's own client and dump tool are there (`mariadb`, `mariadb-dump`; the `mysql*`
    names are only a compatibility package on newer Debian); else Oracle MySQL's."""
    return shutil.which("mariadb") is not None and shutil.which("mariadb-dump") is not None


def sql_client() -> str:
    return "mariadb" if mariadb_tools() else "mysql"


def mysql_rows(sql: str) -> list[list[str]]:
    out = run([sql_client(), "-N", "-B", "-e", sql])
    return [line.split("\t") for line in out.splitlines() if line]


def mysql_tables(database: str) -> set[str]:
    rows = mysql_rows(
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{database}'"
    )
    return {r[0] for r in rows}


class MysqlSession:
    """One `mysql` client session as root, fed statements on stdin and read line by line:
    what it holds (a lock, a read view) lasts as long as the session, and no longer than this
    process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sql_client(), "-N", "-B", "--unbuffered"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def say(self, sql: str) -> None:
        self.proc.stdin.write(sql + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        return self.proc.stdout.readline().strip()

    def end(self, sql: str = "") -> None:
        with contextlib.suppress(OSError):
            if sql:
                self.say(sql)
            self.proc.stdin.close()
        self.proc.wait()


class MysqlLock:
    """The named lock, held by a `mysql` client session for as long as this is entered.

    The session (and so the lock) ends when this process dies: a killed backup never
    leaves the lock behind."""

    def __init__(self, wait: int) -> None:
        self.wait = wait
        self.session: MysqlSession | None = None

    def __enter__(self) -> MysqlLock:
        self.session = MysqlSession()
        self.session.say(f"SELECT GET_LOCK('{LOCK_NAME}', {self.wait});")
        answer = self.session.answer()
        if answer != "1":
            self.session.proc.kill()
            raise Failure(
                f"another backup, migration or gc held the data lock for {self.wait} s"
                if answer == "0"
                else "could not take the data lock (is the database server running?)"
            )
        return self

    def __exit__(self, *exc) -> None:
        assert self.session is not None
        self.session.end(f"DO RELEASE_LOCK('{LOCK_NAME}');")


@contextlib.contextmanager
def sqlite_lock(wait: int):
    """The file lock `db_upgrade.py` takes beside the SQLite database (made by the account
    when missing: root creates nothing in the account's area, and opens it without following
    a symlink)."""
    path = f"{SQLITE_DB}.migrate.lock"
    if not exists(path):
        run(as_user(MLFLOW_USER, ["touch", path]))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Failure(
                        f"another backup, migration or gc held the data lock for {wait} s"
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


def data_lock(kind: str, wait: int = 900):
    return MysqlLock(wait) if kind == "mysql" else sqlite_lock(wait)


# --- SQLite files, read and written by the mlflow account ------------------------------

SQLITE_DUMP = """
import os, sqlite3, sys, tempfile
src = sqlite3.connect(sys.argv[1], timeout=120)
if hasattr(src, "serialize"):
    mem = sqlite3.connect(":memory:")
    src.backup(mem)
    data = mem.serialize()
    sys.stdout.buffer.write(data)
else:  # Python < 3.11: through a temporary file of the account's
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(sys.argv[1]), prefix=".backup-")
    try:
        dst = sqlite3.connect(tmp)
        src.backup(dst)
        dst.close()
        with os.fdopen(fd, "rb") as handle:
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
    finally:
        os.unlink(tmp)
"""

SQLITE_QUERY = """
import json, sqlite3, sys
con = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, timeout=60)
out = {}
for name, sql in json.loads(sys.argv[2]).items():
    try:
        row = con.execute(sql).fetchone()
        out[name] = row[0] if row else None
    except sqlite3.Error:
        out[name] = None
print(json.dumps(out))
"""


def sqlite_values(path: str, queries: dict[str, str], python: str = sys.executable) -> dict:
    """Single values from an account's SQLite file, read as that account."""
    if not exists(path):
        return {}
    return python_as(MLFLOW_USER, python, SQLITE_QUERY, path, json.dumps(queries))


def auth_revision(path: str = AUTH_DB) -> str:
    values = sqlite_values(
        path,
        {
            "auth": "SELECT version_num FROM alembic_version_auth",
            "legacy": "SELECT version_num FROM alembic_version",
        },
    )
    return values.get("auth") or values.get("legacy") or ""


# --- what is on the host: versions, schema revisions, counts -----------------------------

REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.M)


def migration_graph(directory: str) -> tuple[set[str], str]:
    """The revisions of an Alembic versions directory and its head, read from the files
    (no import of MLflow: `revision = "…"` and `down_revision = …` lines)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        if not name.endswith(".py") or name.startswith("__"):
            continue
        with open(os.path.join(directory, name)) as handle:
            found = dict((m[1], m[2]) for m in REVISION_LINE.finditer(handle.read()))
        if "revision" not in found:
            continue
        revisions.add(ast.literal_eval(found["revision"]))
        down = ast.literal_eval(found.get("down_revision", "None"))
        parents.update([down] if isinstance(down, str) else [d for d in down or () if d])
    heads = sorted(revisions - parents)
    return revisions, (heads[0] if len(heads) == 1 else ",".join(heads))


FIND_MLFLOW = (
    "import importlib.metadata as m, importlib.util as u, json; "
    "print(json.dumps({'version': m.version('mlflow'), "
    "'package': u.find_spec('mlflow').submodule_search_locations[0]}))"
)


def mlflow_of(python: str) -> dict:
    """MLflow's version and package directory in the env of `python` (nothing imported)."""
    if python == sys.executable:
        spec = importlib.util.find_spec("mlflow")
        info = {
            "version": importlib.metadata.version("mlflow"),
            "package": spec.submodule_search_locations[0],
        }
    else:
        info = json.loads(run([python, "-I", "-c", FIND_MLFLOW]).strip().splitlines()[-1])
    revisions, head = migration_graph(os.path.join(info["package"], "store/db_migrations/versions"))
    auth_revisions, auth_head = migration_graph(
        os.path.join(info["package"], "server/auth/db/migrations/versions")
    )
    return {
        "version": info["version"],
        "head": head,
        "revisions": sorted(revisions),
        "auth_head": auth_head,
        "auth_revisions": sorted(auth_revisions),
    }


def schema_revision(kind: str, python: str = sys.executable) -> str:
    """The tracking database's revision ("" when it has no schema yet)."""
    if kind == "sqlite":
        return (
            sqlite_values(SQLITE_DB, {"v": "SELECT version_num FROM alembic_version"}, python).get(
                "v"
            )
            or ""
        )
    if "alembic_version" not in mysql_tables("mlflow"):
        return ""
    rows = mysql_rows("SELECT version_num FROM mlflow.alembic_version")
    return rows[0][0] if rows else ""


# count name -> (database, table, condition)
COUNTS = {
    "experiments": ("mlflow", "experiments", ""),
    "experiments_deleted": ("mlflow", "experiments", "lifecycle_stage = 'deleted'"),
    "runs": ("mlflow", "runs", ""),
    "runs_deleted": ("mlflow", "runs", "lifecycle_stage = 'deleted'"),
    "params": ("mlflow", "params", ""),
    "metrics": ("mlflow", "metrics", ""),
    "tags": ("mlflow", "tags", ""),
    "registered_models": ("mlflow", "registered_models", ""),
    "model_versions": ("mlflow", "model_versions", ""),
    "aliases": ("mlflow", "registered_model_aliases", ""),
    "logged_models": ("mlflow", "logged_models", ""),
    "optuna_studies": ("optuna", "studies", ""),
    "optuna_trials": ("optuna", "trials", ""),
    "optuna_trials_complete": ("optuna", "trials", "state = 'COMPLETE'"),
    "optuna_trial_values": ("optuna", "trial_values", ""),
}


def count_query(table: str, condition: str, prefix: str = "") -> str:
    where = f" WHERE {condition}" if condition else ""
    return f"SELECT COUNT(*) FROM {prefix}{table}{where}"


def counts(kind: str) -> dict[str, int]:
    """Rows of what a user would miss; a table the schema lacks is left out."""
    if kind == "sqlite":
        queries = {
            name: count_query(table, cond)
            for name, (db, table, cond) in COUNTS.items()
            if db == "mlflow"
        }
        values = sqlite_values(SQLITE_DB, queries)
        return {k: int(v) for k, v in values.items() if v is not None}
    query = count_union()
    return {name: int(value) for name, value in mysql_rows(query)} if query else {}


def count_union() -> str:
    """One MySQL query of every count whose table exists ("" when none does)."""
    present = {db: mysql_tables(db) for db in DATABASES}
    parts = [
        f"SELECT '{name}', ({count_query(table, cond, db + '.')})"
        for name, (db, table, cond) in COUNTS.items()
        if table in present.get(db, set())
    ]
    return " UNION ALL ".join(parts)


def auth_counts() -> dict[str, int]:
    values = sqlite_values(AUTH_DB, {"auth_users": "SELECT COUNT(*) FROM users"})
    return {k: int(v) for k, v in values.items() if v is not None}


def optuna_info() -> dict:
    tables = mysql_tables("optuna")
    info = {}
    if "alembic_version" in tables:
        rows = mysql_rows("SELECT version_num FROM optuna.alembic_version")
        info["alembic"] = rows[0][0] if rows else ""
    if "version_info" in tables:
        rows = mysql_rows("SELECT schema_version, library_version FROM optuna.version_info")
        if rows:
            info["schema_version"], info["library_version"] = rows[0][0], rows[0][1]
    return info


def tree_size(path: str) -> tuple[int, int]:
    """(files, bytes) of the regular files under `path` (a hard-linked file once, as tar
    archives it), as stat sees them: no symlink followed."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(top, name))
                key = (info.st_dev, info.st_ino)
                if (info.st_mode & 0o170000) == 0o100000 and key not in seen:
                    seen.add(key)
                    size += info.st_size
    return len(seen), size


def describe(kind: str) -> dict:
    """Versions and revisions of what this host runs and holds."""
    mine = mlflow_of(sys.executable)
    info = {
        "backend": kind,
        "mlflow_version": mine["version"],
        "schema": schema_revision(kind),
        "schema_head": mine["head"],
        "auth_schema": auth_revision() if exists(AUTH_DB) else None,
        "auth_head": mine["auth_head"],
        "public": exists(AUTH_CONFIG),
    }
    if kind == "mysql":
        info["optuna"] = optuna_info()
        info["db_server"] = run([sql_client(), "-V"]).strip()
    return info


# --- the backup stream -------------------------------------------------------------------
#
# A sequence of frames: one kind byte, a 4-byte big-endian length, the payload. Parts are
# sent at the same time (the databases' dump beside the trees' tars), so each has an id:
#   H  JSON: what comes (parts, estimated raw sizes)                      once, first
#   B  JSON: a part begins {"id", "name"}
#   D  one byte (the part's id), then bytes of that part
#   P  JSON: progress {"id", "raw": bytes read at that part's source so far}
#   E  JSON: a part ends {"id", "name", "sha256", "bytes", "raw_bytes", ...}
#   M  JSON: the host's manifest (versions, counts before and after, parts)
#   Z  empty: the stream is complete (a stream without it is not a backup)


class Frames:
    """Frames onto a file descriptor; one frame at a time across threads."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def put(self, kind: bytes, payload: bytes = b"", prefix: bytes = b"") -> None:
        with self.lock:
            self._write(kind + struct.pack(">I", len(prefix) + len(payload)) + prefix)
            if payload:
                self._write(payload)

    def json(self, kind: bytes, value: dict) -> None:
        self.put(kind, json.dumps(value, sort_keys=True).encode())


def parse_listing(line: str) -> tuple[str, int] | None:
    """(type, size) from a `tar -cvv --numeric-owner` line, None for anything else."""
    fields = line.split(None, 5)
    if len(fields) < 6 or len(fields[0]) != 10 or fields[0][0] not in "-dlhcbps":
        return None
    if not fields[2].isdigit():
        return None
    return fields[0][0], int(fields[2])


class Relay:
    """source process stdout -> (counted) -> compressor stdin, on a thread. `seen` is set once
    `marker` went by (or the source ended): for the dump, its snapshot exists by then."""

    def __init__(self, src, dst, marker: bytes = b"", seen: threading.Event | None = None):
        self.raw = 0
        self.error: BaseException | None = None
        self.marker, self.seen = marker, seen
        self.thread = threading.Thread(target=self._run, args=(src, dst), daemon=True)
        self.thread.start()

    def _run(self, src, dst) -> None:
        tail = b""
        try:
            while True:
                chunk = os.read(src.fileno(), CHUNK)
                if not chunk:
                    break
                self.raw += len(chunk)
                if self.seen is not None and not self.seen.is_set():
                    if self.marker in tail + chunk:
                        self.seen.set()
                    tail = chunk[-len(self.marker) :]
                dst.write(chunk)
        except BaseException as exc:
            self.error = exc
        finally:
            if self.seen is not None:
                self.seen.set()
            with contextlib.suppress(OSError):
                dst.close()


class Part(threading.Thread):
    """One part of the stream: `argv`'s stdout, counted, through zstd (`level` None: as it
    is), framed under the part's id; `end` (its sha256 and sizes) or `error` once done. With
    `listing`, the regular files tar listed on stderr are counted."""

    def __init__(self, frames: Frames, ident: int, name: str, argv: list[str], *,
                 level: int | None, listing: bool = False, tolerated: tuple[int, ...] = (0,),
                 marker: bytes = b"", seen: threading.Event | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True, name=f"part {name}")
        self.frames, self.number, self.name, self.argv = frames, ident, name, argv
        self.level, self.listing, self.tolerated = level, listing, tolerated
        self.marker, self.seen = marker, seen
        self.end: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.end = self.send()
        except BaseException as exc:
            self.error = exc
        finally:
            if self.seen is not None:
                self.seen.set()

    def send(self) -> dict:
        frames, name, prefix = self.frames, self.name, bytes([self.number])
        frames.json(b"B", {"id": self.number, "name": name})
        producer = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        files = {"files": 0, "file_bytes": 0}
        notes: list[str] = []

        def read_errors() -> None:
            for raw_line in producer.stderr:
                line = raw_line.decode(errors="replace").rstrip("\n")
                entry = parse_listing(line) if self.listing else None
                if entry is None:
                    if len(notes) < 20:
                        notes.append(line)
                elif entry[0] == "-":
                    files["files"] += 1
                    files["file_bytes"] += entry[1]

        errors = threading.Thread(target=read_errors, daemon=True)
        errors.start()
        compressor = relay = None
        if self.level is not None:
            compressor = subprocess.Popen(
                ["zstd", "-q", f"-{self.level}", "-T0", "-c"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            relay = Relay(producer.stdout, compressor.stdin, self.marker, self.seen)
            source = compressor.stdout
        else:  # as it is: read here, counted and watched for the marker here
            source = producer.stdout
        digest, sent, shown, tail = hashlib.sha256(), 0, time.monotonic(), b""
        fd = source.fileno()
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            sent += len(chunk)
            if relay is None and self.seen is not None and not self.seen.is_set():
                if self.marker in tail + chunk:
                    self.seen.set()
                tail = chunk[-len(self.marker) :]
            frames.put(b"D", chunk, prefix)
            if time.monotonic() - shown > 0.5:
                shown = time.monotonic()
                frames.json(b"P", {"id": self.number, "raw": relay.raw if relay else sent})
        rc = producer.wait()
        errors.join()
        if relay is not None:
            relay.thread.join()
            if compressor.wait() != 0 or relay.error is not None:
                raise Failure(f"part {name}: compression failed ({relay.error or 'zstd'})")
        if rc not in self.tolerated:
            detail = notes[-1] if notes else "no output"
            raise Failure(f"part {name}: {self.argv[0]} failed (exit {rc}): {detail}")
        end = {
            "id": self.number,
            "name": name,
            "sha256": digest.hexdigest(),
            "bytes": sent,
            "raw_bytes": relay.raw if relay else sent,
            "compression": "zstd" if self.level is not None else "none",
        }
        if self.listing:
            end.update(files)
        if notes and rc != 0:
            end["warnings"] = notes  # e.g. tar: a file changed while it was read
        frames.json(b"E", end)
        return end


def part_name(base: str, level: int | None) -> str:
    return f"{base}.zst" if level is not None else base


def dump_argv(databases: tuple[str, ...] = DATABASES) -> list[str]:
    """One consistent snapshot (one transaction) of the databases while the server runs:
    every MLflow and Optuna table is InnoDB. MySQL's dump leaves out GTID statements (a
    restore onto another server must not claim its transactions)."""
    present = {r[0] for r in mysql_rows("SELECT schema_name FROM information_schema.schemata")}
    tool = ["mariadb-dump"] if mariadb_tools() else ["mysqldump", "--set-gtid-purged=OFF"]
    return [
        *tool,
        "--single-transaction",
        "--quick",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--databases",
        *[db for db in databases if db in present],
    ]


def tar_argv(directory: str, user: str) -> list[str]:
    """The tree as the account reads it: GNU tar, symlinks archived as symlinks."""
    return as_user(
        user,
        [
            "tar",
            "--create",
            "--file=-",
            f"--directory={directory}",
            "--format=posix",
            "--numeric-owner",
            "-vv",
            ".",
        ],
    )


def estimate(kind: str) -> dict[str, int]:
    sizes = {}
    if kind == "mysql":
        rows = mysql_rows(
            "SELECT IFNULL(SUM(data_length + index_length), 0) FROM information_schema.tables "
            "WHERE table_schema IN ('mlflow', 'optuna')"
        )
        sizes["databases"] = int(rows[0][0]) if rows else 0
    elif exists(SQLITE_DB):
        sizes["databases"] = os.lstat(SQLITE_DB).st_size
    if exists(AUTH_DB):
        sizes["auth"] = os.lstat(AUTH_DB).st_size
    for base, (directory, _user) in TREES.items():
        if os.path.isdir(directory):
            sizes[base] = tree_size(directory)[1]
    return sizes


class Snapshot(MysqlSession):
    """A MySQL read view opened now (`START TRANSACTION WITH CONSISTENT SNAPSHOT`) whose
    counts can be read later, while a dump that started after it runs: they are then a lower
    bound of the dump's own (what it holds was appended after, never before)."""

    def __init__(self) -> None:
        super().__init__()
        self.say("START TRANSACTION WITH CONSISTENT SNAPSHOT; SELECT 'ready';")
        if self.answer() != "ready":
            raise Failure("could not open a read snapshot of the databases")

    def counts(self) -> dict[str, int]:
        query = count_union()
        values: dict[str, int] = {}
        if query:
            self.say(f"{query}; SELECT 'end', 0;")
            for line in self.proc.stdout:
                name, _, value = line.rstrip("\n").partition("\t")
                if name == "end":
                    break
                values[name] = int(value)
        self.end("COMMIT;")
        return values


def cmd_backup(args: argparse.Namespace) -> int:
    """The backup stream (see the frames above). The databases' dump starts first; the trees
    start once its snapshot exists, and run beside it: every run the dump holds was there
    before any tree was read. Counts come from a snapshot opened just before the dump and
    from the databases just after it."""
    frames = Frames()
    kind = backend()
    level = args.level if have_zstd() and args.level > 0 else None
    with data_lock(kind, args.lock_wait):
        info = describe(kind)
        sizes = estimate(kind)
        names = ["databases"] + (["auth"] if exists(AUTH_DB) else [])
        names += [base for base, (directory, _) in TREES.items() if os.path.isdir(directory)]
        names += ["secrets"] if args.with_secrets else []
        frames.json(b"H", {"format": FORMAT, "parts": names, "estimate": sizes})
        snapshot_made = threading.Event()
        before: dict[str, int] = {}
        if kind == "mysql":
            snapshot = Snapshot()
            database = Part(frames, 1, part_name("databases.sql", level), dump_argv(),
                            level=level, marker=b"CREATE DATABASE", seen=snapshot_made)  # fmt: skip
            database.start()
            counting = threading.Thread(target=lambda: before.update(snapshot.counts()))
            counting.start()
        else:
            before.update(counts(kind))
            argv = as_user(MLFLOW_USER, [sys.executable, "-I", "-c", SQLITE_DUMP, SQLITE_DB])
            database = Part(frames, 1, part_name("mlflow.db", level), argv, level=level,
                            seen=snapshot_made)  # fmt: skip
            database.start()
            counting = None
        snapshot_made.wait()
        others: dict[str, Part] = {}
        if exists(AUTH_DB):
            argv = as_user(MLFLOW_USER, [sys.executable, "-I", "-c", SQLITE_DUMP, AUTH_DB])
            others["auth"] = Part(frames, 2, part_name("basic_auth.db", level), argv, level=level)
        for ident, (base, (directory, user)) in enumerate(TREES.items(), 3):
            if os.path.isdir(directory):
                # tar's exit 1: a file changed while it was read (a live upload)
                others[base] = Part(frames, ident, part_name(f"{base}.tar", level),
                                    tar_argv(directory, user), level=level, listing=True,
                                    tolerated=(0, 1))  # fmt: skip
        if args.with_secrets:
            argv = ["tar", "--create", "--file=-", f"--directory={SECRETS_DIR}", "."]
            others["secrets"] = Part(frames, 9, part_name("secrets.tar", level), argv, level=level)
        for part in others.values():
            part.start()
        database.join()
        if counting is not None:
            counting.join()
        after = counts(kind) if database.error is None else {}
        auth = auth_counts() if exists(AUTH_DB) else {}
        for part in others.values():
            part.join()
        for part in (database, *others.values()):
            if part.error is not None:
                raise part.error
        manifest = {
            **info,
            "counts": {"before": {**before, **auth}, "after": {**after, **auth}},
            "parts": {"databases": database.end} | {k: p.end for k, p in others.items()},
            "with_secrets": bool(args.with_secrets),
        }
        frames.json(b"M", manifest)
    frames.put(b"Z")
    return 0


# --- inspect: what a restore checks before it changes anything ---------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    kind = backend()
    mine = mlflow_of(sys.executable)
    info = describe(kind)
    info["revisions"] = mine["revisions"]
    info["auth_revisions"] = mine["auth_revisions"]
    info["counts"] = {**counts(kind), **(auth_counts() if exists(AUTH_DB) else {})}
    if kind == "mysql":
        rows = (
            mysql_rows("SELECT COUNT(*) FROM mlflow.experiments WHERE experiment_id <> 0")
            if "experiments" in mysql_tables("mlflow")
            else [["0"]]
        )
        info["counts"]["experiments_beyond_default"] = int(rows[0][0])
    else:
        values = sqlite_values(
            SQLITE_DB, {"e": "SELECT COUNT(*) FROM experiments WHERE experiment_id <> 0"}
        )
        info["counts"]["experiments_beyond_default"] = int(values.get("e") or 0)
    info["artifacts"] = dict(zip(("files", "bytes"), tree_size(ARTIFACTS), strict=True))
    free = shutil.disk_usage(MLFLOW_STATE if os.path.isdir(MLFLOW_STATE) else "/")
    info["free_bytes"] = free.free
    info["zstd"] = have_zstd()
    info["admin_secret"] = exists(ADMIN_SECRET)
    print(json.dumps(info, sort_keys=True))
    return 0


# --- restore steps -----------------------------------------------------------------------


def decompress_argv(compression: str) -> list[str]:
    return ["zstd", "-dc"] if compression == "zstd" else ["cat"]


def cmd_restore_begin(args: argparse.Namespace) -> int:
    """Stop what writes; remember what ran, so that restore-finish starts it again."""
    os.makedirs(os.path.dirname(RESTORE_STATE), exist_ok=True)
    if exists(RESTORE_STATE):  # a restore that did not finish: its record is the truth
        with open(RESTORE_STATE) as handle:
            active = json.load(handle)
    else:
        active = [u for u in WRITERS if unit_active(u)]
        tmp = RESTORE_STATE + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(active, handle)
        os.replace(tmp, RESTORE_STATE)
    run(["systemctl", "stop", *WRITERS], check=False)
    print(json.dumps({"stopped": active}))
    return 0


def cmd_restore_db(args: argparse.Namespace) -> int:
    """stdin: the dump (mysql) or the SQLite file (sqlite), as compressed in the backup."""
    kind = backend()
    if kind != args.backend:
        raise Failure(f"the backup's backend is {args.backend}, this host's is {kind}")
    if kind == "mysql":
        spec = f"CHARACTER SET {CHARSET} COLLATE {COLLATION}"
        reset = "; ".join(
            f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db} {spec}" for db in DATABASES
        )
        with data_lock(kind, 60):
            run([sql_client(), "-e", reset])
            load_mysql(sys.stdin.buffer, args.compression)
    else:
        restore_file_as(MLFLOW_USER, SQLITE_DB, sys.stdin.buffer, args.compression, sqlite=True)
        for suffix in ("-journal", "-wal", "-shm"):
            if exists(SQLITE_DB + suffix):
                run(as_user(MLFLOW_USER, ["rm", "-f", SQLITE_DB + suffix]))
    print(json.dumps({"schema": schema_revision(kind)}))
    return 0


def load_mysql(stream, compression: str) -> None:
    """Decompress `stream` into `mysql` (the dump names its databases), without MariaDB's
    sandbox line, which MySQL's client refuses."""
    unpack = subprocess.Popen(decompress_argv(compression), stdin=stream, stdout=subprocess.PIPE)
    client = subprocess.Popen(
        [sql_client(), "--batch"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(client.stderr.read()), daemon=True)
    reader.start()
    first = True
    try:
        while True:
            chunk = unpack.stdout.read(CHUNK)
            if not chunk:
                break
            if first:
                chunk, first = SANDBOX_LINE.sub(b"", chunk, count=1), False
            client.stdin.write(chunk)
    except BrokenPipeError:
        pass
    finally:
        with contextlib.suppress(OSError):
            client.stdin.close()
    rc, urc = client.wait(), unpack.wait()
    reader.join()
    if urc != 0:
        raise Failure("the database part does not decompress (truncated or corrupt)")
    if rc != 0:
        tail = b"".join(errors).decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise Failure(f"loading the dump failed: {tail[0]}")


CHECK_SQLITE = """
import sqlite3, sys
ok = sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0]
sys.exit(0 if ok == "ok" else f"{sys.argv[1]}: {ok}")
"""


def pipe_into(argv: list[str], stream, compression: str) -> tuple[int, str]:
    """Decompress `stream` (as root: only bytes) into `argv` (run as its account); the
    worst exit code of the two and the tail of `argv`'s stderr."""
    unpack = subprocess.Popen(decompress_argv(compression), stdin=stream, stdout=subprocess.PIPE)
    sink = subprocess.Popen(argv, stdin=unpack.stdout, stderr=subprocess.PIPE)
    unpack.stdout.close()
    err = sink.stderr.read().decode(errors="replace").strip().splitlines()
    rc, urc = sink.wait(), unpack.wait()
    if urc != 0:
        return urc, "the part does not decompress (truncated or corrupt)"
    return rc, (err[-1] if err else "")


def restore_file_as(user: str, target: str, stream, compression: str, sqlite: bool) -> None:
    """Write `stream` (decompressed) to `target` as `user`: a temporary name beside it,
    checked, then renamed over it."""
    tmp = os.path.join(os.path.dirname(target), "." + os.path.basename(target) + ".restoring")
    rc, err = pipe_into(as_user(user, ["sh", "-c", 'cat > "$1"', "sh", tmp]), stream, compression)
    if rc != 0:
        run(as_user(user, ["rm", "-f", tmp]), check=False)
        raise Failure(f"{os.path.basename(target)}: {err or 'could not be written'}")
    if sqlite:
        check = subprocess.run(
            as_user(user, [sys.executable, "-I", "-c", CHECK_SQLITE, tmp]), capture_output=True
        )
        if check.returncode != 0:
            run(as_user(user, ["rm", "-f", tmp]), check=False)
            raise Failure(f"{os.path.basename(target)}: not a sound SQLite database")
    run(as_user(user, ["mv", "-f", tmp, target]))


AUTH_MIGRATE = """
import sys
import sqlalchemy
from mlflow.server.auth.db import utils
utils.migrate(sqlalchemy.create_engine("sqlite:///" + sys.argv[1]), "head")
"""

AUTH_ADMIN = """
import json, sqlite3, sys
from werkzeug.security import check_password_hash, generate_password_hash
path, user, mode = sys.argv[1:4]
password = sys.stdin.readline().rstrip("\\n")
con = sqlite3.connect(path, timeout=60)
row = con.execute("SELECT password_hash FROM users WHERE username = ?", (user,)).fetchone()
if row is None:
    state = "no-admin"
elif check_password_hash(row[0], password):
    state = "ok"
elif mode == "set":
    with con:
        con.execute(
            "UPDATE users SET password_hash = ? WHERE username = ?",
            (generate_password_hash(password), user),
        )
    state = "set"
else:
    state = "differs"
print(json.dumps({"state": state}))
"""


def migrate_auth_db(python: str, path: str) -> None:
    """The auth database's own Alembic migrations, with the env of `python`, as mlflow."""
    run(as_user(MLFLOW_USER, [python, "-I", "-c", AUTH_MIGRATE, path]))


def admin_password(path: str, mode: str, python: str = sys.executable) -> str:
    """Compare (or set) the auth database's admin password with the host's secret, as the
    mlflow account; the secret goes on the child's stdin."""
    if not exists(path):
        return "absent"
    if not exists(ADMIN_SECRET):
        return "no-secret"
    with open(ADMIN_SECRET, "rb") as handle:
        secret = handle.read().strip() + b"\n"
    result = python_as(MLFLOW_USER, python, AUTH_ADMIN, path, ADMIN_USER, mode, stdin=secret)
    return result.get("state", "?")


def cmd_restore_auth(args: argparse.Namespace) -> int:
    """stdin: the auth database. Migrated (when older) and its admin password made the
    host's own before it replaces the current one, all as the mlflow account."""
    staged = os.path.join(MLFLOW_STATE, ".basic_auth.db.staged")
    restore_file_as(MLFLOW_USER, staged, sys.stdin.buffer, args.compression, sqlite=True)
    mine = mlflow_of(sys.executable)
    revision = auth_revision(staged)
    if revision != mine["auth_head"]:
        migrate_auth_db(sys.executable, staged)
    admin = admin_password(staged, "set")
    run(as_user(MLFLOW_USER, ["mv", "-f", staged, AUTH_DB]))
    print(json.dumps({"auth_schema": auth_revision(), "admin": admin}))
    return 0


OWN_FILES = """
import hashlib, json, os, sys
root = sys.argv[1]
try:
    with open(os.path.join(root, "notebooks", ".shipped.json")) as handle:
        shipped = json.load(handle)
except (OSError, ValueError):
    shipped = {}
own = 0
for top, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d != ".ipynb_checkpoints"]
    for name in names:
        path = os.path.join(top, name)
        rel = os.path.relpath(path, root)
        if rel == os.path.join("notebooks", ".shipped.json"):
            continue
        if os.path.dirname(rel) == "notebooks" and name in shipped and not os.path.islink(path):
            with open(path, "rb") as handle:
                if hashlib.sha256(handle.read()).hexdigest() == shipped[name]:
                    continue
        own += 1
print(json.dumps({"own": own}))
"""


def own_files(directory: str, user: str) -> int:
    """Files in a workspace besides the shipped notebooks as they were shipped, counted by
    its account."""
    return int(python_as(user, sys.executable, OWN_FILES, directory).get("own", 0))


def cmd_restore_tree(args: argparse.Namespace) -> int:
    """stdin: the tree's tar. Extracted by the owning account beside the live tree, counted,
    then swapped in. The previous tree is removed, or with `--keep-previous` kept aside when
    it holds anything but the shipped notebooks as shipped."""
    directory, user = TREES[args.name]
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    staging = os.path.join(parent, f".{base}.restoring")
    run(as_user(user, ["rm", "-rf", staging]))
    run(as_user(user, ["mkdir", "-p", staging]))
    extract = ["tar", "--extract", "--file=-", f"--directory={staging}", "--no-same-owner"]
    rc, err = pipe_into(as_user(user, extract), sys.stdin.buffer, args.compression)
    if rc != 0:
        run(as_user(user, ["rm", "-rf", staging]), check=False)
        raise Failure(f"part {args.name}: extraction failed: {err or rc}")
    files, size = tree_size(staging)
    if (files, size) != (args.files, args.bytes):
        run(as_user(user, ["rm", "-rf", staging]), check=False)
        raise Failure(
            f"part {args.name}: {files} files / {size} bytes extracted, the manifest says "
            f"{args.files} / {args.bytes}"
        )
    kept = ""
    if exists(directory):
        aside = os.path.join(parent, f"{base}.before-restore-{stamp()}")
        keep = args.keep_previous and own_files(directory, user) > 0
        run(as_user(user, ["mv", directory, aside]))
        if keep:
            kept = aside
        else:
            run(as_user(user, ["rm", "-rf", aside]))
    run(as_user(user, ["mv", staging, directory]))
    print(json.dumps({"files": files, "bytes": size, "kept": kept}))
    return 0


def cmd_restore_secrets(args: argparse.Namespace) -> int:
    """stdin: the secrets' tar, into root's own secret store (files 0600)."""
    os.makedirs(SECRETS_DIR, mode=0o700, exist_ok=True)
    extract = ["tar", "--extract", "--file=-", f"--directory={SECRETS_DIR}", "--no-same-owner"]
    rc, err = pipe_into(extract, sys.stdin.buffer, args.compression)
    if rc != 0:
        raise Failure(f"part secrets: extraction failed: {err or rc}")
    for name in os.listdir(SECRETS_DIR):
        os.chmod(os.path.join(SECRETS_DIR, name), 0o600)
    print(json.dumps({"secrets": sorted(os.listdir(SECRETS_DIR))}))
    return 0


OPTUNA_UPGRADE = """
import json, sys
import optuna
from optuna.storages import RDBStorage
url = sys.stdin.readline().strip()
storage = RDBStorage(url, skip_compatibility_check=True)
current, head = storage.get_current_version(), storage.get_head_version()
if current != head:
    storage.upgrade()
print(json.dumps({"optuna_alembic": storage.get_current_version(), "was": current}))
"""


def upgrade_optuna(demo_python: str, db_port: int) -> dict:
    """Optuna's own migration of a restored study database, as the demo account; the
    tuning account's URL (with its password) on stdin."""
    if "alembic_version" not in mysql_tables("optuna") or not exists(TUNING_SECRET):
        return {}
    if not os.access(demo_python, os.X_OK):
        return {}
    from urllib.parse import quote

    with open(TUNING_SECRET) as handle:
        password = handle.read().strip()
    url = f"mysql+pymysql://{TUNING_DB_USER}:{quote(password, safe='')}@127.0.0.1:{db_port}/optuna"
    return python_as(DEMO_USER, demo_python, OPTUNA_UPGRADE, stdin=(url + "\n").encode())


def migrate_tracking(python: str, no_lock: bool = False) -> str:
    """`db_upgrade.py` with the env of `python`, as the mlflow account (as the role runs it)."""
    argv = [
        "env",
        f"PYTHONPYCACHEPREFIX={PYCACHE}",
        python,
        DB_UPGRADE,
        ENV_FILE,
        *(["--no-lock"] if no_lock else []),
    ]
    proc = subprocess.run(as_user(MLFLOW_USER, argv), capture_output=True)
    if proc.returncode != 0:
        raise Failure(f"schema migration failed: {exception_line(proc.stderr)}")
    return proc.stdout.decode().strip().splitlines()[-1] if proc.stdout.strip() else ""


EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit))\b:?\s*(.*)$")


def exception_line(stderr: bytes, limit: int = 240) -> str:
    """The message of the last Python exception in a traceback (the line that names it),
    without SQLAlchemy's wrapper prefixes; else the last line."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        found = EXCEPTION.match(line)
        if found and not line.startswith("File "):
            message = re.sub(r"^\([\w.]+\)\s*", "", found[2]) or found[1]
            return message[:limit]
    return (lines[-1] if lines else "no output")[:limit]


def wait_health(port: int, seconds: int = 300) -> bool:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{port}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=3) as answer:
            if answer.status == 200:
                return True
        time.sleep(0.5)
    return False


def cmd_restore_finish(args: argparse.Namespace) -> int:
    """Migrate what is older than this host's MLflow (tracking, auth, Optuna), start what
    restore-begin stopped, wait for MLflow, and count."""
    kind = backend()
    mine = mlflow_of(sys.executable)
    before = schema_revision(kind)
    migrated = ""
    if before and before != mine["head"]:
        migrated = migrate_tracking(sys.executable)
    optuna = upgrade_optuna(args.demo_python, args.db_port) if kind == "mysql" else {}
    active = []
    if exists(RESTORE_STATE):
        with open(RESTORE_STATE) as handle:
            active = json.load(handle)
    wanted = [u for u in reversed(WRITERS) if u in active and not u.endswith("gc.service")]
    if MLFLOW_UNIT not in wanted:
        wanted.insert(0, MLFLOW_UNIT)
    run(["systemctl", "start", *wanted], check=False)
    healthy = wait_health(args.port)
    if exists(RESTORE_STATE):
        os.unlink(RESTORE_STATE)
    result = {
        "schema_before": before,
        "schema": schema_revision(kind),
        "migrated": bool(migrated),
        "optuna": optuna,
        "started": wanted,
        "healthy": healthy,
        "counts": {**counts(kind), **(auth_counts() if exists(AUTH_DB) else {})},
        "artifacts": dict(zip(("files", "bytes"), tree_size(ARTIFACTS), strict=True)),
    }
    print(json.dumps(result, sort_keys=True))
    return 0 if healthy else 1


# --- safe upgrade: back up, migrate, and switch envs only once that worked ---------------


def dump_to(kind: str, directory: str, level: int | None) -> dict:
    """The tracking database (and the auth one) into root's `directory`, compressed."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    made = {}
    snapshot = [sys.executable, "-I", "-c", SQLITE_DUMP]
    if kind == "mysql":
        sources = [("mlflow.sql", dump_argv(("mlflow",)))]
    else:
        sources = [("mlflow.db", as_user(MLFLOW_USER, [*snapshot, SQLITE_DB]))]
    if exists(AUTH_DB):
        sources.append(("basic_auth.db", as_user(MLFLOW_USER, [*snapshot, AUTH_DB])))
    for name, argv in sources:
        path = os.path.join(directory, part_name(name, level))
        with open(path, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            producer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if level is not None:
                packer = subprocess.Popen(
                    ["zstd", "-q", f"-{level}", "-T0", "-c"], stdin=producer.stdout, stdout=out
                )
                producer.stdout.close()
                prc, zrc = producer.wait(), packer.wait()
            else:
                shutil.copyfileobj(producer.stdout, out, CHUNK)
                prc, zrc = producer.wait(), 0
            err = producer.stderr.read().decode(errors="replace").strip()
            if prc != 0 or zrc != 0:
                raise Failure(f"backup before the upgrade failed ({name}): {err or prc}")
        made[name] = path
    return made


def restore_from(kind: str, made: dict, level: int | None) -> None:
    """Put back what `dump_to` saved (a clean database: DROP + CREATE, then the dump)."""
    compression = "zstd" if level is not None else "none"
    if kind == "mysql":
        spec = f"CHARACTER SET {CHARSET} COLLATE {COLLATION}"
        run([sql_client(), "-e", f"DROP DATABASE IF EXISTS mlflow; CREATE DATABASE mlflow {spec}"])
        with open(made["mlflow.sql"], "rb") as dump:
            load_mysql(dump, compression)
    else:
        with open(made["mlflow.db"], "rb") as dump:
            restore_file_as(MLFLOW_USER, SQLITE_DB, dump, compression, sqlite=True)
    if "basic_auth.db" in made:
        with open(made["basic_auth.db"], "rb") as dump:
            restore_file_as(MLFLOW_USER, AUTH_DB, dump, compression, sqlite=True)


def prune_upgrade_backups(keep: int) -> None:
    if not os.path.isdir(UPGRADE_BACKUPS):
        return
    names = sorted(n for n in os.listdir(UPGRADE_BACKUPS) if n.startswith("pre-upgrade-"))
    for name in names[:-keep] if keep else names:
        shutil.rmtree(os.path.join(UPGRADE_BACKUPS, name), ignore_errors=True)


def stop(units: tuple[str, ...]) -> list[str]:
    active = [u for u in units if unit_active(u)]
    run(["systemctl", "stop", *units], check=False)
    return active


def switch_envs(env: str, new: str) -> None:
    """`new` becomes `env`; the previous env goes (its MLflow cannot read the migrated
    schema anyway). Renames only: both are in root's env directory."""
    previous = f"{env}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    os.rename(env, previous)
    os.rename(new, env)
    shutil.rmtree(previous, ignore_errors=True)


def warm_in_background(python: str, imports: str) -> None:
    """Compile what the server imports into root's bytecode cache (paths changed with the
    switch), as a transient unit that does not hold up the restart."""
    subprocess.run(
        ["systemd-run", "--quiet", "--collect", "--no-block",
         f"--unit=mlflow-stack-warm-{os.getpid()}", "env", f"PYTHONPYCACHEPREFIX={PYCACHE}",
         python, "-W", "ignore", "-c", imports],
        check=False,
    )  # fmt: skip


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Bring the database to the MLflow that will serve (the `--next` env when one is ready,
    else the current one), with a backup first, and switch to `--next` only once that
    worked. A failed migration puts the backup back; with `--next` the previous MLflow then
    serves again (the new env stays for the next try)."""
    kind = backend()
    target = args.next or args.env
    wanted = mlflow_of(f"{target}/bin/python")
    old = mlflow_of(f"{args.env}/bin/python") if args.next else wanted
    level = 3 if have_zstd() else None
    report: dict = {"from": old["version"], "to": wanted["version"], "switched": False}
    with data_lock(kind, args.lock_wait):
        current = schema_revision(kind)
        auth_current = auth_revision() if exists(AUTH_DB) else ""
        if current and current not in wanted["revisions"]:
            raise Failure(
                f"the database's schema {current} is newer than MLflow {wanted['version']}'s; "
                "not switching (restore a matching backup or pin a newer MLflow)"
            )
        migrate = bool(current) and current != wanted["head"]
        migrate_auth = bool(auth_current) and auth_current != wanted["auth_head"]
        report.update(schema_before=current, auth_before=auth_current)
        if not (migrate or migrate_auth or args.next):
            print(json.dumps({**report, "schema": current}, sort_keys=True))
            return 0
        stopped = stop((*GC_UNITS, *RECORDER_UNITS, MLFLOW_UNIT))
        touched = False
        try:
            if migrate or migrate_auth:
                directory = os.path.join(UPGRADE_BACKUPS, f"pre-upgrade-{stamp()}-{current}")
                made = dump_to(kind, directory, level)
                fd = os.open(
                    os.path.join(directory, "manifest.json"), os.O_WRONLY | os.O_CREAT, 0o600
                )
                with os.fdopen(fd, "w") as handle:
                    json.dump({**report, "backend": kind, "files": sorted(made)}, handle)
                report["backup"] = directory
                touched = True
                try:
                    if migrate:
                        migrate_tracking(f"{target}/bin/python", no_lock=True)
                    if migrate_auth:
                        migrate_auth_db(f"{target}/bin/python", AUTH_DB)
                except Failure as exc:
                    restore_from(kind, made, level)
                    touched = False
                    if args.next:
                        run(["systemctl", "start", *reversed(stopped)], check=False)
                        serving = (
                            "serves again"
                            if wait_health(args.port, 180)
                            else "was started again (no answer on /health yet)"
                        )
                        stopped = []
                        raise Failure(
                            f"{exc}; the database was restored from {directory} and MLflow "
                            f"{old['version']} {serving} (MLflow {wanted['version']} waits "
                            f"in {args.next} for the next try)"
                        ) from None
                    raise Failure(
                        f"{exc}; the database was restored from {directory}; MLflow stays "
                        "stopped until the database is fixed and provision runs again"
                    ) from None
            if args.next:
                switch_envs(args.env, args.next)
                report["switched"] = True
                if args.warm:
                    warm_in_background(f"{args.env}/bin/python", args.warm)
        except BaseException:
            # the previous MLflow serves again when its env and its database are as they were
            if args.next and not report["switched"] and not touched and stopped:
                run(["systemctl", "start", *reversed(stopped)], check=False)
            raise
        report["schema"] = schema_revision(kind)
        report["auth_schema"] = auth_revision() if exists(AUTH_DB) else ""
        prune_upgrade_backups(args.keep)
    # the role's handlers start the units again, with the unit files of this converge
    print(json.dumps(report, sort_keys=True))
    return 0


def cmd_auth_admin(args: argparse.Namespace) -> int:
    state = admin_password(AUTH_DB, "set" if args.set else "check")
    print(state)
    return 0


# --- gc: deleted runs and their artifacts, never what the registry still points at -------

GUARD_RUNS = """
SELECT r.run_uuid FROM runs r
WHERE r.lifecycle_stage = 'deleted' AND r.deleted_time IS NOT NULL AND r.deleted_time <= :cut
  AND NOT EXISTS (SELECT 1 FROM model_versions mv WHERE mv.run_id = r.run_uuid
                  AND (mv.current_stage IS NULL OR mv.current_stage <> 'Deleted_Internal'))
"""
KEPT_RUNS = """
SELECT DISTINCT r.run_uuid FROM runs r JOIN model_versions mv ON mv.run_id = r.run_uuid
WHERE r.lifecycle_stage = 'deleted' AND r.deleted_time IS NOT NULL AND r.deleted_time <= :cut
  AND (mv.current_stage IS NULL OR mv.current_stage <> 'Deleted_Internal')
"""
GUARD_MODELS = """
SELECT m.model_id FROM logged_models m
WHERE m.lifecycle_stage = 'deleted' AND m.last_updated_timestamp_ms <= :cut
  AND NOT EXISTS (SELECT 1 FROM model_versions mv WHERE mv.source = {models_uri}
                  AND (mv.current_stage IS NULL OR mv.current_stage <> 'Deleted_Internal'))
"""
GUARD_EXPERIMENTS = """
SELECT e.experiment_id FROM experiments e
WHERE e.lifecycle_stage = 'deleted' AND e.last_update_time IS NOT NULL
  AND e.last_update_time < :cut AND e.experiment_id <> 0
  AND NOT EXISTS (SELECT 1 FROM runs r JOIN model_versions mv ON mv.run_id = r.run_uuid
                  WHERE r.experiment_id = e.experiment_id
                  AND (mv.current_stage IS NULL OR mv.current_stage <> 'Deleted_Internal'))
  AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.experiment_id = e.experiment_id
                  AND r.lifecycle_stage <> 'deleted')
"""
AGE = re.compile(
    r"^((?P<days>[.\d]+?)d)?((?P<hours>[.\d]+?)h)?((?P<minutes>[.\d]+?)m)?((?P<seconds>[.\d]+?)s)?$"
)


def age_ms(text: str) -> int:
    """`mlflow gc --older-than`'s format (30d, 1d2h3m4s) in milliseconds."""
    match = AGE.match(text)
    if not match or not any(match.groupdict().values()):
        raise Failure(f"--older-than {text!r}: use e.g. 30d, 12h or 1d2h3m4s")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return int(datetime.timedelta(**parts).total_seconds() * 1000)


def cmd_gc(args: argparse.Namespace) -> int:
    """As the mlflow account (its unit): `mlflow gc` for the deleted runs, logged models and
    experiments older than --older-than, except what a live registered model version still
    needs (gc does not look at the registry); then the empty run directories it leaves."""
    import sqlalchemy

    uri = os.environ.get("MLFLOW_BACKEND_STORE_URI")
    if not uri:
        raise Failure("MLFLOW_BACKEND_STORE_URI is not set (see the unit's EnvironmentFile)")
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.exists(os.path.join(credentials, "admin_password")):
        with open(os.path.join(credentials, "admin_password")) as handle:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = handle.read().strip()
        os.environ["MLFLOW_TRACKING_USERNAME"] = ADMIN_USER
    delta = age_ms(args.older_than)
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    kind = "sqlite" if engine.dialect.name == "sqlite" else "mysql"
    with gc_lock(engine, kind, args.lock_wait):
        cut = int(time.time() * 1000) - delta
        with engine.connect() as conn:
            names = set(sqlalchemy.inspect(conn).get_table_names())

            def ids(sql: str) -> list[str]:
                return [str(r[0]) for r in conn.execute(sqlalchemy.text(sql), {"cut": cut})]

            runs, kept = ids(GUARD_RUNS), ids(KEPT_RUNS)
            concat = (
                "'models:/' || m.model_id" if kind == "sqlite" else "CONCAT('models:/', m.model_id)"
            )
            guard = GUARD_MODELS.format(models_uri=concat)
            models = ids(guard) if "logged_models" in names else []
            model_dirs = (
                [
                    (str(r[0]), str(r[1]))
                    for r in conn.execute(
                        sqlalchemy.text(
                            "SELECT model_id, experiment_id FROM logged_models "
                            "WHERE model_id IN :ids"
                        ).bindparams(sqlalchemy.bindparam("ids", expanding=True)),
                        {"ids": models or ["-"]},
                    )
                ]
                if models
                else []
            )
            experiments = ids(GUARD_EXPERIMENTS)
            run_dirs = [
                (str(r[0]), str(r[1]))
                for r in conn.execute(
                    sqlalchemy.text(
                        "SELECT run_uuid, experiment_id FROM runs WHERE run_uuid IN :ids"
                    ).bindparams(sqlalchemy.bindparam("ids", expanding=True)),
                    {"ids": runs or ["-"]},
                )
            ]
        summary = {
            "runs": len(runs),
            "kept_for_registry": kept,
            "logged_models": len(models),
            "experiments": len(experiments),
        }
        if runs or models or experiments:
            collect(uri, args, runs, models, experiments, delta)
        removed = 0
        leftovers = [os.path.join(args.artifacts, e, r) for r, e in run_dirs]
        leftovers += [os.path.join(args.artifacts, e, "models", m) for m, e in model_dirs]
        for path in leftovers:  # gc leaves the emptied directories of what it deleted
            for candidate in (os.path.join(path, "artifacts"), path):
                with contextlib.suppress(OSError):
                    os.rmdir(candidate)
            removed += not os.path.lexists(path)
        summary["empty_dirs_removed"] = removed
    print(json.dumps(summary, sort_keys=True))
    return 0


@contextlib.contextmanager
def gc_lock(engine, kind: str, wait: int):
    import sqlalchemy

    if kind == "mysql":
        with engine.connect() as conn:
            got = conn.execute(
                sqlalchemy.text("SELECT GET_LOCK(:n, :w)"), {"n": LOCK_NAME, "w": wait}
            ).scalar()
            if got != 1:
                raise Failure(f"a backup or migration held the data lock for {wait} s")
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": LOCK_NAME})
    else:
        with open(f"{engine.url.database}.migrate.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def collect(uri: str, args, runs: list[str], models: list[str], experiments: list[str], delta):
    """MLflow's own gc on exactly these ids (its artifact deletes go through the server)."""
    import mlflow
    from mlflow import cli

    if not hasattr(cli, "_gc_tracking_resources"):
        raise Failure(
            f"MLflow {mlflow.__version__} has no _gc_tracking_resources; gc needs MLflow 3"
        )
    mlflow.set_tracking_uri(args.tracking_uri)
    store = cli._get_store(uri, args.artifacts)
    cli._gc_tracking_resources(
        backend_store=store,
        run_ids=runs,
        experiment_ids=experiments or None,
        logged_model_ids=models,
        older_than=args.older_than,
        time_delta=delta,
        skip_experiments=not experiments,
        skip_logged_models=not hasattr(store, "_hard_delete_logged_model"),
    )


# --- command line ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stackdata.py", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backup")
    p.add_argument("--with-secrets", action="store_true")
    p.add_argument("--level", type=int, default=1, help="zstd level; 0: no compression")
    p.add_argument("--lock-wait", type=int, default=600)
    p.set_defaults(func=cmd_backup)
    sub.add_parser("inspect").set_defaults(func=cmd_inspect)
    sub.add_parser("restore-begin").set_defaults(func=cmd_restore_begin)
    p = sub.add_parser("restore-db")
    p.add_argument("--backend", required=True, choices=("mysql", "sqlite"))
    p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    p.set_defaults(func=cmd_restore_db)
    p = sub.add_parser("restore-auth")
    p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    p.set_defaults(func=cmd_restore_auth)
    p = sub.add_parser("restore-tree")
    p.add_argument("name", choices=sorted(TREES))
    p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    p.add_argument("--files", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--keep-previous", action="store_true")
    p.set_defaults(func=cmd_restore_tree)
    p = sub.add_parser("restore-secrets")
    p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    p.set_defaults(func=cmd_restore_secrets)
    p = sub.add_parser("restore-finish")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--db-port", type=int, default=3306)
    p.add_argument("--demo-python", default="/opt/anaconda/envs/demo/bin/python")
    p.set_defaults(func=cmd_restore_finish)
    p = sub.add_parser("upgrade")
    p.add_argument("--env", required=True)
    p.add_argument("--next", default="")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--warm", default="")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--lock-wait", type=int, default=900)
    p.set_defaults(func=cmd_upgrade)
    p = sub.add_parser("auth-admin")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true")
    group.add_argument("--set", action="store_true")
    p.set_defaults(func=cmd_auth_admin)
    p = sub.add_parser("gc")
    p.add_argument("--older-than", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--artifacts", default=ARTIFACTS)
    p.add_argument("--lock-wait", type=int, default=3600)
    p.set_defaults(func=cmd_gc)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Failure as exc:
        log(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
