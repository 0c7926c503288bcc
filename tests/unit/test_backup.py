"""Backup and restore without a host: the stream's frames, the receiver, the checks a restore
makes before it changes anything, and the host program's pure parts."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from mlflow_stack import layout
from mlflow_stack.actions import backup as B
from mlflow_stack.actions import restore as R
from mlflow_stack.actions.remote import ActionError
from mlflow_stack.hostside import stackdata as S


def framed(tmp_path: Path, parts: dict[str, bytes], *, end: bool = True, lie: str = "") -> bytes:
    """A stream as `stackdata.py backup` writes it: the parts' data frames interleaved."""
    path = tmp_path / "stream"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    frames = S.Frames(fd)
    frames.json(b"H", {"format": 1, "parts": list(parts), "estimate": {"x": 10}})
    manifest_parts = {}
    chunks = {}
    for ident, (name, data) in enumerate(parts.items(), 1):
        frames.json(b"B", {"id": ident, "name": name})
        chunks[ident] = [data[i : i + 70_000] for i in range(0, len(data), 70_000)]
    while any(chunks.values()):
        for ident, pending in chunks.items():
            if pending:
                frames.put(b"D", pending.pop(0), bytes([ident]))
                frames.json(b"P", {"id": ident, "raw": 1})
    for ident, (name, data) in enumerate(parts.items(), 1):
        digest = hashlib.sha256(data).hexdigest() if name != lie else "0" * 64
        info = {"id": ident, "name": name, "sha256": digest, "bytes": len(data),
                "raw_bytes": len(data)}  # fmt: skip
        frames.json(b"E", info)
        manifest_parts[name.split(".")[0]] = info
    frames.json(b"M", {"parts": manifest_parts, "mlflow_version": "3.17.2"})
    if end:
        frames.put(b"Z")
    os.close(fd)
    return path.read_bytes()


def feed_in_pieces(receiver: B.Receiver, stream: bytes, seed: int = 7) -> None:
    rng = random.Random(seed)
    pos = 0
    while pos < len(stream):
        size = rng.choice([1, 3, 5, 4096, 65536, 1 << 20])
        receiver.feed(stream[pos : pos + size])
        pos += size


def test_the_receiver_writes_each_part_and_checks_its_hash(tmp_path):
    parts = {
        "databases.sql.zst": os.urandom(300_000),
        "artifacts.tar.zst": b"a" * 1_000_001,
        "workspace.tar.zst": b"",
    }
    stream = framed(tmp_path, parts)
    out = tmp_path / "out"
    out.mkdir()
    receiver = B.Receiver(out)
    feed_in_pieces(receiver, stream)
    assert receiver.complete
    receiver.close()
    for name, data in parts.items():
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_mode & 0o777 == 0o600
    assert receiver.manifest["mlflow_version"] == "3.17.2"
    assert receiver.header["estimate"] == {"x": 10}


def test_a_stream_without_its_end_is_not_complete(tmp_path):
    stream = framed(tmp_path, {"databases.sql.zst": b"x" * 5000}, end=False)
    out = tmp_path / "out"
    out.mkdir()
    receiver = B.Receiver(out)
    receiver.feed(stream[: len(stream) // 2])
    assert not receiver.complete


def test_a_part_that_arrives_different_is_refused(tmp_path):
    stream = framed(tmp_path, {"databases.sql.zst": b"x" * 5000}, lie="databases.sql.zst")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(B.StreamError, match=r"part databases\.sql\.zst arrived different"):
        B.Receiver(out).feed(stream)


@pytest.mark.parametrize("name", ["../evil", ".hidden", "manifest.json", "a/b"])
def test_a_part_name_cannot_escape_or_replace_the_manifest(tmp_path, name):
    path = tmp_path / "s"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    S.Frames(fd).json(b"B", {"id": 1, "name": name})
    os.close(fd)
    with pytest.raises(B.StreamError, match="bad part"):
        B.Receiver(tmp_path).feed(path.read_bytes())


def make_backup(tmp_path: Path, **manifest) -> Path:
    directory = tmp_path / "bk"
    directory.mkdir()
    data = b"-- dump\n" * 100
    (directory / "databases.sql.zst").write_bytes(data)
    part = {
        "name": "databases.sql.zst",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "raw_bytes": len(data),
        "compression": "zstd",
    }
    base = {
        "format": 1,
        "host": "a",
        "created": "2026-12-03T00:00:00+00:00",
        "backend": "mysql",
        "mlflow_version": "3.17.2",
        "schema": "dc11669786a5",
        "auth_schema": None,
        "parts": {"databases": part},
        "counts": {"before": {"runs": 5}, "after": {"runs": 7}},
    }
    (directory / "manifest.json").write_text(json.dumps({**base, **manifest}))
    return directory


def test_a_complete_backup_loads_and_a_partial_one_is_refused(tmp_path):
    loaded = R.load(make_backup(tmp_path))
    assert set(loaded.parts) == {"databases"}
    partial = tmp_path / ".a-20261203T000000Z.partial"
    partial.mkdir()
    with pytest.raises(
        ActionError, match=r"not a complete backup: no manifest\.json .*did not fin"
    ):
        R.load(partial)


def test_a_corrupt_part_is_refused_with_its_name(tmp_path):
    directory = make_backup(tmp_path)
    path = directory / "databases.sql.zst"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ActionError) as refused:
        R.load(directory)
    message = str(refused.value)
    assert "part databases.sql.zst is corrupt" in message and "\n" not in message


HOST = {
    "backend": "mysql",
    "mlflow_version": "3.17.2",
    "revisions": ["0584bdc529eb", "bda7b8c39065", "dc11669786a5"],
    "auth_revisions": ["8606fa83a998", "f1a2b3c4d5e6"],
    "counts": {"runs": 0, "experiments_beyond_default": 0},
    "artifacts": {"files": 0},
    "zstd": True,
    "free_bytes": 10**12,
}


def refusal(tmp_path, host=None, force=False, **manifest):
    return R.refusals(
        R.load(make_backup(tmp_path, **manifest)), {**HOST, **(host or {})}, "b", force
    )


def test_restore_checks(tmp_path):
    assert refusal(tmp_path) is None
    for i, (manifest, host, force, expected) in enumerate(
        [
            ({"mlflow_version": "3.18.0"}, {}, False, "newer than the host's MLflow 3.17.2"),
            ({"schema": "ffffffffffff"}, {}, False, "newer than"),
            ({"auth_schema": "999999999999"}, {}, False, "newer than"),
            ({"backend": "sqlite"}, {}, False, "runs the mysql backend"),
            ({}, {"counts": {"runs": 3}}, False, "holds data of its own (3 runs)"),
            ({}, {"artifacts": {"files": 2}}, False, "2 artifact files"),
            ({}, {"zstd": False}, False, "no zstd"),
            ({}, {"free_bytes": 100}, True, "free some space"),
        ]
    ):
        sub = tmp_path / str(i)
        sub.mkdir()
        assert expected in (refusal(sub, host, force, **manifest) or ""), (manifest, host)
    forced = tmp_path / "forced"
    forced.mkdir()
    assert refusal(forced, {"counts": {"runs": 3}}, force=True) is None
    older = tmp_path / "older"
    older.mkdir()
    assert refusal(older, mlflow_version="2.22.5", schema="0584bdc529eb") is None


def test_counts_must_lie_within_the_manifests_bounds():
    manifest = {"counts": {"before": {"runs": 5, "params": 9}, "after": {"runs": 7, "params": 9}}}
    assert R.count_mismatches(manifest, {"runs": 6, "params": 9}) == []
    wrong = R.count_mismatches(manifest, {"runs": 8, "params": 8})
    assert wrong == [
        "runs: 8 restored, the backup holds 5..7",
        "params: 8 restored, the backup holds 9",
    ]


def test_version_order():
    assert R.version_key("3.17.2") > R.version_key("3.2.0") > R.version_key("2.22.5")
    assert R.version_key("3.0.1rc1") == (3, 0, 1)


def test_tar_listing_lines():
    assert S.parse_listing("-rw-r----- 998/998     1234 2026-12-03 15:08 ./1/a b/c.json") == (
        "-",
        1234,
    )
    assert S.parse_listing("drwxr-x--- 998/998        0 2026-12-03 15:08 ./1/") == ("d", 0)
    assert S.parse_listing("tar: ./x: file changed as we read it") is None


def test_migration_graph_from_files(tmp_path):
    files = {
        "a1_init.py": 'revision = "a1"\ndown_revision = None\n',
        "b2_next.py": 'revision: str = "b2"\ndown_revision: str | None = "a1"\n',
        "c3_x.py": 'revision = "c3"\ndown_revision = "b2"\n',
        "d4_branch.py": 'revision = "d4"\ndown_revision = "b2"\n',
        "e5_merge.py": 'revision = "e5"\ndown_revision = ("c3", "d4")\n',
        "__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    revisions, head = S.migration_graph(str(tmp_path))
    assert revisions == {"a1", "b2", "c3", "d4", "e5"} and head == "e5"


def test_the_installed_mlflows_graph_has_the_pinned_head():
    import importlib.util

    from roles.mlflow_server import SCHEMA_HEAD

    package = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
    _, head = S.migration_graph(str(package / "store/db_migrations/versions"))
    _, auth_head = S.migration_graph(str(package / "server/auth/db/migrations/versions"))
    assert head == SCHEMA_HEAD and auth_head == "f1a2b3c4d5e6"


def test_gc_age_format():
    assert S.age_ms("30d") == 30 * 86_400_000
    assert S.age_ms("1d2h3m4s") == ((26 * 60 + 3) * 60 + 4) * 1000
    for bad in ("", "30", "thirty days"):
        with pytest.raises(S.Failure):
            S.age_ms(bad)


def test_the_host_program_agrees_with_the_layout():
    assert S.MLFLOW_STATE == layout.MLFLOW_STATE and S.ARTIFACTS == layout.MLFLOW_ARTIFACTS
    assert S.SQLITE_DB == layout.MLFLOW_SQLITE and S.AUTH_DB == layout.MLFLOW_AUTH_DB
    assert S.WORKSPACE == layout.DEMO_WORKSPACE and S.DEMO_STATE == layout.DEMO_STATE
    assert S.ENV_FILE == layout.MLFLOW_ENV_FILE and S.AUTH_CONFIG == layout.MLFLOW_AUTH_CONFIG
    assert S.DB_UPGRADE == layout.MLFLOW_DB_UPGRADE and S.PYCACHE == layout.MLFLOW_PYCACHE
    assert S.SECRETS_DIR == layout.SECRETS_DIR and S.ADMIN_USER == layout.MLFLOW_ADMIN
    assert layout.secret_path("mlflow_admin_password") == S.ADMIN_SECRET
    assert S.UPGRADE_BACKUPS == layout.UPGRADE_BACKUPS
    assert (S.MLFLOW_USER, S.DEMO_USER) == (layout.MLFLOW_USER, layout.DEMO_USER)
    assert S.DATABASES == layout.DATABASES and S.TUNING_DB_USER == layout.TUNING_DB_USER
    assert S.MLFLOW_UNIT == layout.MLFLOW_UNIT and S.JUPYTER_UNIT == layout.JUPYTER_UNIT
    assert S.WARM_UNIT == layout.WARM_UNIT
    assert S.RECORDER_UNITS == (layout.RECORDER_SOCKET_UNIT, layout.RECORDER_UNIT)
    assert S.GC_UNITS == (layout.GC_TIMER, layout.GC_UNIT)


def test_the_agent_runs_only_when_it_is_this_versions():
    command = B.agent_command(layout.Layout(), "backup", "--level", "1")
    assert B.agent_digest() in command and f"exit {B.STALE_AGENT}" in command
    assert command.endswith(
        f"/opt/anaconda/envs/mlflow/bin/python -I {layout.STACKDATA} backup --level 1"
    )


@pytest.mark.parametrize(
    ("installed", "client", "dump"),
    [
        ({"mariadb", "mariadb-dump", "mysql", "mysqldump"}, "mariadb", ["mariadb-dump"]),
        ({"mysql", "mysqldump"}, "mysql", ["mysqldump", "--set-gtid-purged=OFF"]),
    ],
)
def test_the_dump_and_client_are_the_servers_own(monkeypatch, installed, client, dump):
    """MariaDB's tools by their own names; Oracle MySQL's without GTID statements (a
    restore onto another server must not claim its transactions)."""
    monkeypatch.setattr(
        S.shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None
    )
    monkeypatch.setattr(S, "mysql_rows", lambda sql: [["mlflow"], ["optuna"], ["mysql"]])
    argv = S.dump_argv()
    assert S.sql_client() == client
    assert argv[: len(dump)] == dump
    assert "--single-transaction" in argv
    assert argv[-3:] == ["--databases", "mlflow", "optuna"]
