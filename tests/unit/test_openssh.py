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

KNOWN = Target(
    "web", "192.0.2.7", 2222, "ubuntu", Path("/k/id"), Path("/k/known_hosts"),
    host_key_policy="strict",
)  # fmt: skip
PINNED = KNOWN  # the sandbox's shape: its own known_hosts, strict
LOOSE = Target("web", "192.0.2.7", 22, "ubuntu")
ED25519 = "SHA256:" + "A" * 43
FILES = openssh.Files(Path("/c/ssh_config-x"), Path("/c/known-hosts-x.sh"), "")


def option(argv: list[str], name: str) -> str | None:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    found = [v.split("=", 1)[1] for v in values if v.startswith(name + "=")]
    return found[0] if found else None


def test_a_known_hosts_file_is_checked_with_the_inventorys_policy():
    argv = openssh.command_argv(KNOWN, Path("/c/s"), "sh -c true", FILES)
    assert option(argv, "StrictHostKeyChecking") == "yes"
    assert option(argv, "UserKnownHostsFile") == "/k/known_hosts"
    assert option(argv, "GlobalKnownHostsFile") == "/dev/null"
    assert option(argv, "IdentitiesOnly") == "yes"
    assert option(argv, "BatchMode") == "yes"
    assert option(argv, "ControlMaster") == "no" and option(argv, "ControlPath") == "/c/s"
    assert argv[argv.index("-F") + 1] == "/c/ssh_config-x"
    assert argv[argv.index("-i") + 1] == "/k/id"
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "ubuntu"
    assert argv[-3:] == ["--", "192.0.2.7", "sh -c true"]
    default = Target(**{**KNOWN.__dict__, "host_key_policy": None})
    argv = openssh.master_argv(default, Path("/c/s"), FILES)
    assert option(argv, "StrictHostKeyChecking") == "accept-new"  # its file, accept-new


def test_by_default_host_keys_are_left_to_the_configuration_files():
    argv = openssh.master_argv(LOOSE, Path("/c/s"), FILES)
    for name in ("StrictHostKeyChecking", "UserKnownHostsFile", "GlobalKnownHostsFile",
                 "HostKeyAlias", "KnownHostsCommand"):  # fmt: skip
        assert option(argv, name) is None, name  # ~/.ssh/config, then our accept-new
    assert argv[argv.index("-F") + 1] == "/c/ssh_config-x"
    assert "-i" not in argv
    assert {"-M", "-N", "-f"} <= set(argv)
    assert option(argv, "ControlPersist") == str(openssh.CONTROL_PERSIST)


def test_an_explicit_policy_goes_on_the_command_line():
    strict = Target(**{**LOOSE.__dict__, "host_key_policy": "strict"})
    assert option(openssh.master_argv(strict, Path("/c/s"), FILES), "StrictHostKeyChecking") == (
        "yes"
    )
    off = openssh.master_argv(Target(**{**LOOSE.__dict__, "host_key_policy": "off"}),
                              Path("/c/s"), FILES)  # fmt: skip
    assert option(off, "StrictHostKeyChecking") == "no"
    assert option(off, "UserKnownHostsFile") == "/dev/null"  # nothing checked, nothing written


def test_pinned_keys_are_the_only_ones_accepted():
    pinned = Target(**{**LOOSE.__dict__, "host_keys": (f"ssh-ed25519 {ED25519}",)})
    argv = openssh.master_argv(pinned, Path("/c/s"), FILES)
    assert option(argv, "StrictHostKeyChecking") == "yes"
    assert option(argv, "UserKnownHostsFile") == "/dev/null"
    assert option(argv, "GlobalKnownHostsFile") == "/dev/null"
    assert option(argv, "HostKeyAlias") == openssh.PIN_ALIAS
    assert option(argv, "HostKeyAlgorithms") == "ssh-ed25519"
    assert option(argv, "KnownHostsCommand") == f"/c/known-hosts-x.sh %H %t %f %K {ED25519}"
    untyped = Target(**{**LOOSE.__dict__, "host_keys": (ED25519,)})
    assert option(openssh.master_argv(untyped, Path("/c/s"), FILES), "HostKeyAlgorithms") is None


def test_the_configuration_puts_the_users_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    text = openssh.config_text(Path("/c/helper.sh"))
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == f'Include "{tmp_path}/.ssh/config"'
    assert lines.index("StrictHostKeyChecking accept-new") > 0
    assert lines[-1] == 'Include "/etc/ssh/ssh_config"'
    # $HOME is not root's passwd home here: its known_hosts, not the passwd home's
    assert f'UserKnownHostsFile "{tmp_path}/.ssh/known_hosts"' in text
    assert 'KnownHostsCommand "/c/helper.sh" %H %t %f %K' in text


def effective(tmp_path: Path, monkeypatch, user_config: str | None, target: Target) -> dict:
    """What ssh itself makes of our options and configuration (`ssh -G`)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    if user_config is not None:
        (home / ".ssh/config").write_text(user_config)
        (home / ".ssh/config").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    files = openssh.Files.in_dir(tmp_path).install()
    argv = ["ssh", "-G", *openssh.base_options(target, files), "--", openssh.destination(target)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {k: v for k, _, v in (line.partition(" ") for line in out.splitlines())}


@pytest.mark.skipif(not use_openssh(), reason="needs the OpenSSH client")
def test_ssh_keeps_what_the_user_set_and_our_defaults_for_the_rest(tmp_path, monkeypatch):
    got = effective(tmp_path, monkeypatch, None, LOOSE)
    assert got["stricthostkeychecking"] == "accept-new"
    assert got["userknownhostsfile"].split()[0] == f"{tmp_path}/home/.ssh/known_hosts"
    config = (
        "Host 192.0.2.7\n  StrictHostKeyChecking yes\n  UserKnownHostsFile /u/kh\n"
        "  HostKeyAlias myhost\n"
    )
    got = effective(tmp_path, monkeypatch, config, LOOSE)
    assert got["stricthostkeychecking"] == "true"  # ssh -G's word for yes
    assert got["userknownhostsfile"] == "/u/kh"
    assert got["hostkeyalias"] == "myhost"
    strict = Target(**{**LOOSE.__dict__, "host_key_policy": "accept-new"})
    got = effective(tmp_path, monkeypatch, config, strict)
    assert got["stricthostkeychecking"] == "accept-new"  # written in the inventory: it wins


@pytest.mark.skipif(not use_openssh(), reason="needs the OpenSSH client")
def test_an_ssh_config_alias_is_what_ssh_connects_to(tmp_path, monkeypatch):
    alias = Target("box", "192.0.2.9", 22, "ubuntu", ssh_host="box")
    got = effective(tmp_path, monkeypatch, "Host box\n  HostName 192.0.2.9\n  HostKeyAlias bx\n",
                    alias)  # fmt: skip
    assert (got["hostname"], got["hostkeyalias"]) == ("192.0.2.9", "bx")


def test_the_known_hosts_command_notes_the_key_and_vouches_for_pins(tmp_path):
    helper = tmp_path / "helper.sh"
    helper.write_text(openssh.HELPER)
    helper.chmod(0o700)
    spy = tmp_path / "offered"
    env = {**os.environ, openssh.OFFERED_ENV: str(spy)}

    def run(*args: str) -> str:
        return subprocess.run([str(helper), *args], capture_output=True, text=True, env=env,
                              check=True).stdout  # fmt: skip

    assert run("alias", "", "", "") == "" and not spy.exists()  # ssh ordering its algorithms
    assert run("alias", "ssh-ed25519", ED25519, "AAAAkey") == ""  # not pinned: nothing vouched
    assert spy.read_text() == f"ssh-ed25519 {ED25519}\n"
    assert run("alias", "ssh-ed25519", ED25519, "AAAAkey", "SHA256:other", ED25519) == (
        "alias ssh-ed25519 AAAAkey\n"
    )
    assert run("alias", "ssh-ed25519", ED25519, "AAAAkey", "SHA256:other") == ""


def test_percent_in_paths_is_escaped_and_spaces_are_kept():
    odd = Target("w", "h", 22, "u", Path("/keys/my key%1"))
    argv = openssh.command_argv(odd, Path("/c/s%x"), "true", FILES)
    assert argv[argv.index("-i") + 1] == "/keys/my key%%1"  # an argument: no quotes
    assert option(argv, "ControlPath") == "/c/s%%x"


def test_a_relative_key_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = openssh.master_argv(Target("w", "h", 22, "u", Path("keys/id")), Path("/c/s"), FILES)
    assert argv[argv.index("-i") + 1] == str(tmp_path / "keys/id")


def test_one_control_socket_per_target_credentials_and_host_key_rules():
    base = openssh.control_path(PINNED, Path("/d"), FILES)
    assert base == openssh.control_path(PINNED, Path("/d"), FILES)
    variants = [
        Target(**{**PINNED.__dict__, "key_file": Path("/k/other")}),
        Target(**{**PINNED.__dict__, "port": 22}),
        Target(**{**PINNED.__dict__, "host_key_policy": "off"}),  # never reused under strict
        Target(**{**PINNED.__dict__, "host_keys": (ED25519,)}),
        Target(**{**PINNED.__dict__, "known_hosts": Path("/k/other_known_hosts")}),
    ]
    paths = {base, *(openssh.control_path(t, Path("/d"), FILES) for t in variants)}
    other_config = openssh.Files(Path("/c/ssh_config-y"), FILES.helper, "")
    paths.add(openssh.control_path(PINNED, Path("/d"), other_config))
    assert len(paths) == len(variants) + 2
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
    ids=["auth", "refused", "timeout", "dns", "other"],
)
def test_ssh_errors_become_one_line_messages(stderr, expected):
    message = openssh.classify("web", PINNED, stderr)
    assert message.startswith(expected) and "\n" not in message


KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOVg0g0QUvuO3b8Am2xYb9dptN8ZqF1IGDcP6hb2PUsf"
CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:NewNewNewNewNewNewNewNewNewNewNewNewNewNewNew.
Please contact your system administrator.
Add correct host key in {kh} to get rid of this message.
Offending ED25519 key in {kh}:2
  remove with:
  ssh-keygen -f "{kh}" -R "[192.0.2.7]:2222"
Host key for [192.0.2.7]:2222 has changed and you have requested strict checking.
Host key verification failed.
"""


def test_a_changed_key_is_one_line_with_both_fingerprints_and_the_fix(tmp_path):
    from mlflow_stack.engine import hostkeys

    kh = tmp_path / "known_hosts"
    kh.write_text(f"# comment\n[192.0.2.7]:2222 ssh-ed25519 {KEY}\n")
    expected = hostkeys.fingerprint(__import__("base64").b64decode(KEY))
    message = openssh.classify("web", PINNED, CHANGED.format(kh=kh))
    assert "\n" not in message
    assert message.startswith("web: host key of ubuntu@192.0.2.7:2222 has changed: offered ")
    assert "SHA256:NewNewNewNewNewNewNewNewNewNewNewNewNewNewNew (ED25519)" in message
    assert f"expected {expected} (ssh-ed25519, {kh}:2)" in message
    assert f"ssh-keygen -R '[192.0.2.7]:2222' -f {kh}" in message
    assert "nothing was sent to it" in message


def test_an_unknown_key_under_strict_checking_names_the_key_offered(tmp_path):
    stderr = (
        "No ED25519 host key is known for [192.0.2.7]:2222 and you have requested strict "
        "checking.\r\nHost key verification failed.\r\n"
    )
    offered = openssh.Offered("ssh-ed25519", "SHA256:" + "B" * 43)
    message = openssh.classify("web", PINNED, stderr, offered, ["/k/known_hosts"])
    assert message == (
        "web: host key of ubuntu@192.0.2.7:2222 is unknown and host keys are checked strictly: "
        f"offered SHA256:{'B' * 43} (ssh-ed25519), expected a key listed in /k/known_hosts "
        "(none for [192.0.2.7]:2222); nothing was sent to it; check the key out of band (EC2: "
        "the instance's console output, Get system log) and pin it in the inventory "
        f"(hosts.web.host_key: SHA256:{'B' * 43})"
    )
    pinned = Target(**{**LOOSE.__dict__, "host_keys": (ED25519,)})
    message = openssh.classify(
        "web", pinned, stderr.replace("[192.0.2.7]:2222", openssh.PIN_ALIAS), offered
    )
    assert f"does not match the inventory's pin: offered SHA256:{'B' * 43}" in message
    assert f"expected {ED25519} (inventory host_key)" in message


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


def test_pins_on_an_openssh_without_known_hosts_command_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(openssh, "ssh_version", lambda: (8, 4))
    pinned = Target(**{**LOOSE.__dict__, "host_keys": (ED25519,)})
    with pytest.raises(HostError, match=r"pinned host_key needs OpenSSH 8\.5 or later"):
        openssh.check_pins_supported("web", pinned)
    openssh.check_pins_supported("web", LOOSE)  # no pin: any OpenSSH
    text = openssh.config_text(Path("/c/helper.sh"))
    lines = text.splitlines()  # an older ssh skips the helper instead of failing
    assert lines.index("IgnoreUnknown KnownHostsCommand") < next(
        i for i, line in enumerate(lines) if line.startswith("KnownHostsCommand")
    )
