"""The OpenSSH link without a host: options, control sockets, error messages, process I/O."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_stack.engine import openssh
from mlflow_stack.engine.host import Host, HostError, Target, use_openssh

PINNED = Target("web", "192.0.2.7", 2222, "ubuntu", Path("/k/id"), Path("/k/known_hosts"))
LOOSE = Target("web", "192.0.2.7", 22, "ubuntu")


def option(argv: list[str], name: str) -> str | None:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    found = [v.split("=", 1)[1] for v in values if v.startswith(name + "=")]
    return found[0] if found else None


def test_pinned_host_keys_are_checked_strictly_with_only_the_inventory_key():
    argv = openssh.command_argv(PINNED, Path("/c/s"), "sh -c true")
    assert option(argv, "StrictHostKeyChecking") == "yes"
    assert option(argv, "UserKnownHostsFile") == "/k/known_hosts"
    assert option(argv, "GlobalKnownHostsFile") == "/dev/null"
    assert option(argv, "IdentitiesOnly") == "yes"
    assert option(argv, "BatchMode") == "yes"
    assert option(argv, "ControlMaster") == "no" and option(argv, "ControlPath") == "/c/s"
    assert argv[argv.index("-i") + 1] == "/k/id"
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "ubuntu"
    assert argv[-3:] == ["--", "192.0.2.7", "sh -c true"]


def test_without_known_hosts_any_key_is_accepted_and_nothing_written():
    argv = openssh.master_argv(LOOSE, Path("/c/s"))
    assert option(argv, "StrictHostKeyChecking") == "no"
    assert option(argv, "UserKnownHostsFile") == "/dev/null"
    assert "-i" not in argv
    assert {"-M", "-N", "-f"} <= set(argv)
    assert option(argv, "ControlPersist") == str(openssh.CONTROL_PERSIST)


def test_percent_and_spaces_in_paths_are_escaped():
    odd = Target("w", "h", 22, "u", Path("/keys/my key%1"))
    argv = openssh.command_argv(odd, Path("/c/s%x"), "true")
    assert argv[argv.index("-i") + 1] == '"/keys/my key%%1"'
    assert option(argv, "ControlPath") == "/c/s%%x"


def test_a_relative_key_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = openssh.master_argv(Target("w", "h", 22, "u", Path("keys/id")), Path("/c/s"))
    assert argv[argv.index("-i") + 1] == str(tmp_path / "keys/id")


def test_one_control_socket_per_target_and_credentials():
    base = openssh.control_path(PINNED, Path("/d"))
    assert base == openssh.control_path(PINNED, Path("/d"))
    other_key = Target(**{**PINNED.__dict__, "key_file": Path("/k/other")})
    other_port = Target(**{**PINNED.__dict__, "port": 22})
    assert len({base, openssh.control_path(other_key, Path("/d")),
                openssh.control_path(other_port, Path("/d"))}) == 3  # fmt: skip
    assert len(str(base)) < 40  # well under the 108 bytes of a unix socket path


def test_control_dir_is_private_and_refused_when_others_can_enter(tmp_path, monkeypatch):
    monkeypatch.setenv(openssh.DIR_ENV, str(tmp_path / "ctl"))
    made = openssh.control_dir()
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    made.chmod(0o755)
    with pytest.raises(HostError, match="mode 0700"):
        openssh.control_dir()


def test_a_stale_socket_is_removed_and_a_live_one_kept(tmp_path):
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    assert openssh.listening(path)
    server.close()  # the file stays, nobody listens: a killed master
    assert path.exists() and not openssh.listening(path)
    assert not path.exists()
    assert not openssh.listening(tmp_path / "missing")


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            "ubuntu@192.0.2.7: Permission denied (publickey).\r\n",
            "web: SSH authentication failed for ubuntu@192.0.2.7:2222 with key /k/id "
            "(ubuntu@192.0.2.7: Permission denied (publickey).); check the user and the key",
        ),
        (
            "@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
            "Host key verification failed.\n",
            "web: host key of ubuntu@192.0.2.7:2222 does not match the known one",
        ),
        (
            "No ED25519 host key is known for [192.0.2.7]:2222 and you have requested strict "
            "checking.\r\nHost key verification failed.\r\n",
            "web: host key of ubuntu@192.0.2.7:2222 is not in /k/known_hosts",
        ),
        (
            "ssh: connect to host 192.0.2.7 port 2222: Connection refused\r\n",
            "web: cannot reach ubuntu@192.0.2.7:2222: Connection refused; check the address",
        ),
        (
            "ssh: connect to host 192.0.2.7 port 2222: Connection timed out\r\n",
            "web: cannot reach ubuntu@192.0.2.7:2222: no answer within 10 s",
        ),
        (
            "ssh: Could not resolve hostname nowhere: Name or service not known\r\n",
            "web: cannot reach ubuntu@192.0.2.7:2222: Name or service not known",
        ),
        (
            "kex_exchange_identification: Connection closed by remote host\r\n",
            "web: SSH to ubuntu@192.0.2.7:2222 failed: kex_exchange_identification: Connection",
        ),
    ],
    ids=["auth", "changed key", "unknown key", "refused", "timeout", "dns", "other"],
)
def test_ssh_errors_become_one_line_messages(stderr, expected):
    message = openssh.classify("web", PINNED, stderr)
    assert message.startswith(expected) and "\n" not in message


def local(script: str) -> subprocess.Popen:
    """A local process standing in for `ssh`: the same pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_stdin_is_fed_and_output_streamed_line_by_line():
    lines: list[str] = []
    script = (
        "import sys; data = sys.stdin.read(); print('got', len(data)); "
        "print('two', flush=True); sys.stderr.write('warn'); sys.stdout.write('tail'); "
        "sys.exit(3)"
    )
    out = openssh._collect(local(script), b"x" * 300_000, None, lines.append)
    assert (out.rc, out.stderr) == (3, "warn")
    assert out.stdout == "got 300000\ntwo\ntail"
    assert lines == ["got 300000", "two", "tail"]


def test_a_silent_command_is_stopped_after_the_timeout():
    out = openssh._collect(
        local("import time; print('a', flush=True); time.sleep(30)"), None, 0.5, None
    )
    assert out.rc is None and out.stdout == "a\n"


def test_host_run_turns_silence_into_a_host_error():
    class Silent:
        is_open = True

        def run(self, command, stdin, timeout, on_output):
            return openssh.Output(None, "", "")

    host = Host(Target("web", "192.0.2.7"), _link=Silent())
    with pytest.raises(HostError, match="no output for 2 s"):
        host.run("sleep 9", timeout=2)


def test_the_transport_is_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_STACK_SSH", "paramiko")
    assert not use_openssh()
    monkeypatch.setenv("MLFLOW_STACK_SSH", "telnet")
    with pytest.raises(HostError, match="use openssh or paramiko"):
        use_openssh()
    monkeypatch.delenv("MLFLOW_STACK_SSH")
    monkeypatch.setenv("PATH", str(Path(os.devnull).parent / "nonexistent"))
    assert not use_openssh()  # no ssh client: Paramiko


def test_no_locale_is_sent_to_the_host(monkeypatch):
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    env = openssh.ssh_env()
    assert "LANG" not in env and "LC_ALL" not in env and "PATH" in env
