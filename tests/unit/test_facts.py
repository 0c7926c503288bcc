"""Facts: recorded command outputs → parsed values; the batched probe round-trips."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from mlflow_stack.engine import facts as F
from mlflow_stack.engine import probe_script

DEBIAN_12 = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
UBUNTU_2204 = """PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=jammy
"""
UBUNTU_2404 = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""


@pytest.mark.parametrize(
    ("text", "family", "version", "codename"),
    [
        (DEBIAN_12, "debian", "12", "bookworm"),
        (UBUNTU_2204, "ubuntu", "22.04", "jammy"),
        (UBUNTU_2404, "ubuntu", "24.04", "noble"),
    ],
)
def test_os_release(text, family, version, codename):
    info = F.OsRelease().parse(text, 0)
    assert (info.family, info.version_id, info.codename) == (family, version, codename)


def test_packages_only_counts_installed():
    out = (
        "mariadb-server\tii \t1:10.11.6-0+deb12u1\n"
        "mysql-server\tun \t\n"
        "curl:amd64\tii \t7.88.1-10+deb12u5\n"
        "python3\trc \t3.11.2-1+b1\n"
    )
    assert F.Packages(("mariadb-server", "mysql-server", "curl", "python3")).parse(out, 1) == {
        "mariadb-server": "1:10.11.6-0+deb12u1",
        "curl": "7.88.1-10+deb12u5",
    }


def test_path_state_file_and_absent():
    out = "regular file|640|root|mlflow|42\n" + "ab" * 32 + "  /etc/mlflow/mlflow.env\n"
    info = F.PathState("/etc/mlflow/mlflow.env").parse(out, 0)
    assert info == F.PathInfo("file", 0o640, "root", "mlflow", 42, "ab" * 32)
    assert F.PathState("/nope").parse("", 0) is None
    directory = F.PathState("/opt").parse("directory|755|root|root|4096\n", 0)
    assert directory.kind == "directory" and directory.sha256 is None


def test_user_and_group():
    line = "mlflow:x:998:998::/opt/mlflow:/usr/sbin/nologin\n"
    assert F.User("mlflow").parse(line, 0) == F.UserInfo(
        "mlflow", 998, 998, "/opt/mlflow", "/usr/sbin/nologin"
    )
    assert F.User("ghost").parse("", 2) is None


def test_systemctl_show():
    out = (
        "LoadState=loaded\nActiveState=active\nSubState=running\n"
        "UnitFileState=enabled\nNeedDaemonReload=yes\n"
    )
    info = F.Unit("mlflow-server.service").parse(out, 0)
    assert info.exists and info.active and info.enabled and info.need_daemon_reload
    missing = F.Unit("nope.service").parse(
        "LoadState=not-found\nActiveState=inactive\nSubState=dead\nUnitFileState=\n", 0
    )
    assert not missing.exists and not missing.active and not missing.enabled


def test_http_status():
    assert F.Http("http://127.0.0.1:5000/health").parse("200", 0) == 200
    assert F.Http("http://127.0.0.1:5000/health").parse("000", 7) == 0


def test_fact_keys_identify_arguments():
    assert F.PathState("/a").key != F.PathState("/b").key
    assert F.Shell("db", "true").key == F.Shell("db", "false").key  # named guards


def run_local_probe(facts):
    """The probe's script run by a local shell, its output cut apart and parsed per fact."""
    script, marker = probe_script.script([f.command() for f in facts])
    out = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True).stdout
    pieces = probe_script.split_probe(out, marker, len(facts))
    return {f.key: f.parse(text, rc) for f, (text, rc) in zip(facts, pieces, strict=True)}


def test_probe_runs_in_one_shell_and_splits_exactly(tmp_path):
    data = b"line one\nline two without newline"
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "token").write_text("s3cret\n")
    facts = [
        F.PathState(str(path)),
        F.PathState(str(tmp_path / "missing")),
        F.Shell("trailing newlines", "printf 'a\\n\\n'"),
        F.Shell("no newline", "printf 'b'"),
        F.Shell("fails", "echo partial; exit 3"),
        F.DirListing(str(tmp_path)),
        F.FileContents(str(tmp_path / "sub")),
    ]
    values = run_local_probe(facts)
    assert values[facts[0].key].sha256 == hashlib.sha256(data).hexdigest()
    assert values[facts[1].key] is None
    assert values[facts[2].key] == F.ShellResult(0, "a\n\n")
    assert values[facts[3].key] == F.ShellResult(0, "b")
    assert values[facts[4].key] == F.ShellResult(3, "partial\n")
    assert values[facts[5].key] == ("f.txt", "sub")
    assert values[facts[6].key] == {"token": "s3cret\n"}


def test_probe_output_cut_short_is_an_error():
    _, marker = probe_script.script(["echo hi"])
    with pytest.raises(ValueError, match="incomplete"):
        probe_script.split_probe(f"{marker} 0\nhi\n", marker, 1)


def test_long_probe_read_from_stdin_is_not_cut_short(tmp_path):
    """Hundreds of facts (a script far beyond one read buffer), one reading stdin itself."""
    facts = [F.Shell(f"n{i}", f"echo {i}") for i in range(400)]
    facts.insert(7, F.Shell("reads stdin", "cat"))
    values = run_local_probe(facts)
    assert values[facts[-1].key] == F.ShellResult(0, "399\n")
    assert values[facts[7].key] == F.ShellResult(0, "")


def test_probe_runs_facts_concurrently_and_keeps_their_order(tmp_path):
    """A fact waiting for a later fact's file sees it: the facts do not run one by one."""
    flag = tmp_path / "flag"
    wait_for_flag = (
        f"for i in $(seq 200); do [ -e {flag} ] && {{ echo seen; exit 0; }}; sleep 0.05; done; "
        "echo not seen; exit 1"
    )
    facts = [F.Shell("waits", wait_for_flag), F.Shell("creates", f"touch {flag}; echo made")]
    values = run_local_probe(facts)
    assert values[facts[0].key] == F.ShellResult(0, "seen\n")
    assert values[facts[1].key] == F.ShellResult(0, "made\n")
