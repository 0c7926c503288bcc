"""Pure logic of the sandbox host: rendered files, cache key, locations, preflight errors."""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

from mlflow_stack import sandbox as sb
from mlflow_stack import sandbox_tasks
from mlflow_stack.sandbox import base, cgroup, instance, machine, render, rootfs


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(base.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(base.STATE_ENV, str(tmp_path / "state"))


def as_user(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def test_sshd_config_is_key_only_on_loopback():
    text = render.sshd_config(2299)
    lines = set(text.splitlines())
    for wanted in ("ListenAddress 127.0.0.1", "Port 2299", "PasswordAuthentication no",
                   "UseDNS no", "KbdInteractiveAuthentication no"):  # fmt: skip
        assert wanted in lines
    assert "AcceptEnv" not in text  # the client's locale is not forced onto the host


def test_hosts_resolves_the_hostname_and_sudoers_is_passwordless():
    assert "127.0.1.1\tdemo\n" in render.hosts("demo")
    assert render.sudoers("ubuntu") == "ubuntu ALL=(ALL) NOPASSWD:ALL\n"


def test_ca_variables_for_sessions_and_units():
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert f'SSL_CERT_FILE="{bundle}"' in render.environment().splitlines()
    assert f'"SSL_CERT_FILE={bundle}"' in render.systemd_environment()


def test_known_hosts_pins_every_key_to_address_and_port():
    keys = ["ssh-ed25519 AAAAC3Nz root@x\n", "ecdsa-sha2-nistp256 AAAAE2Vj root@x\n"]
    assert render.known_hosts(keys, 2222).splitlines() == [
        "[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nz",
        "[127.0.0.1]:2222 ecdsa-sha2-nistp256 AAAAE2Vj",
    ]
    assert render.known_hosts(keys[:1], 22).startswith("127.0.0.1 ssh-ed25519 ")


def test_ssh_config_entry(tmp_path):
    text = render.ssh_config("demo", 2201, "ubuntu", tmp_path / "k", tmp_path / "kh", "127.0.0.1")
    assert text.startswith("Host demo\n")
    assert "    Port 2201\n" in text and "    StrictHostKeyChecking yes\n" in text


def test_parse_failed_units():
    out = "● foo.service loaded failed failed Foo\nbar.mount loaded failed failed Bar\n\n"
    assert render.parse_failed_units(out) == ["foo.service", "bar.mount"]


def test_cache_key_follows_the_recipe(monkeypatch, tmp_path):
    key = rootfs.cache_key()
    assert key == rootfs.cache_key() and len(key) == 12
    assert rootfs.tarball_path() == tmp_path / "cache" / f"debian-bookworm-rootfs-{key}.tar"
    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "vim"))
    assert rootfs.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(rootfs, "RECIPE_VERSION", rootfs.RECIPE_VERSION + 1)
    assert rootfs.cache_key() != key


def test_debootstrap_command_line():
    argv = rootfs.debootstrap_argv(Path("/x/root"))
    assert argv[:2] == ["debootstrap", "--variant=minbase"]
    assert argv[-3:] == ["bookworm", "/x/root", "http://deb.debian.org/debian"]
    included = argv[2].removeprefix("--include=").split(",")
    for pkg in ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo",
                "ca-certificates", "curl", "iproute2"):  # fmt: skip
        assert pkg in included


def test_locations_follow_the_environment(tmp_path):
    assert sb.cache_dir() == tmp_path / "cache"
    assert sb.instance_dir("demo") == tmp_path / "state" / "sandboxes" / "demo"


def test_default_locations(monkeypatch):
    monkeypatch.delenv(base.CACHE_ENV)
    monkeypatch.delenv(base.STATE_ENV)
    assert sb.cache_dir() == Path("/var/cache/mlflow-stack")
    assert sb.instance_dir("x") == Path("/var/lib/mlflow-stack/sandboxes/x")


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "trail-", "a_b", "a" * 64, "../x"])
def test_bad_names_are_refused(name):
    with pytest.raises(sb.SandboxError, match="invalid sandbox name"):
        sb.instance_dir(name)


@pytest.mark.parametrize("port", [0, 22, 1023, 65536])
def test_bad_ports_are_refused(port):
    with pytest.raises(sb.SandboxError, match="pick one in 1024-65535"):
        base.check_port(port)


def test_not_root_is_reported_first(monkeypatch, tmp_path):
    as_user(monkeypatch)
    assert "needs root" in sb.preflight_problem()
    with pytest.raises(sb.SandboxError, match="run as root or with sudo"):
        sb.up("demo", 2299)
    with pytest.raises(sb.SandboxError, match="needs root"):
        sb.down("demo")
    assert not (tmp_path / "state").exists() and not (tmp_path / "cache").exists()


def test_missing_tools_name_their_debian_packages(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(base, "which", lambda tool: None if tool != "tar" else "/bin/tar")
    problem = sb.preflight_problem()
    assert "debootstrap" in problem and "systemd-nspawn" in problem
    assert "apt-get install debootstrap openssh-client systemd-container" in problem
    without = sb.preflight_problem(need_debootstrap=False)
    assert "debootstrap" not in without and "systemd-container" in without
    monkeypatch.setattr(base, "which", lambda tool: None if tool == "debootstrap" else "/x")
    assert sb.preflight_problem(need_debootstrap=False) is None
    with pytest.raises(sb.SandboxError, match="install the Debian package"):
        sb.up("demo", 2299)  # no cached rootfs yet, so debootstrap is needed


def test_load_ignores_a_stale_pid(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = sb.instance_dir("demo")
    state.mkdir(parents=True)
    (state / "instance.json").write_text(json.dumps({"port": 2299, "pid": dead.pid}))
    assert sb.load("demo") is None
    (state / "instance.json").write_text(json.dumps({"port": 2299, "pid": os.getpid()}))
    assert sb.load("demo") is None  # alive, but not a systemd-nspawn of this rootfs
    assert sb.list_sandboxes() == []
    facts = sb.status("demo")
    assert facts["exists"] and not facts["running"] and facts["port"] == 2299


def test_status_of_an_unknown_sandbox():
    facts = sb.status("nope")
    assert facts["running"] is False and facts["exists"] is False


def test_busy_port_message():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(sb.SandboxError, match=rf"port {port} on 127.0.0.1 is in use"):
            machine.check_port_free(port)


def test_ssh_command_pins_key_and_host(tmp_path):
    info = sb.SandboxInfo("demo", "127.0.0.1", 2299, "ubuntu", tmp_path / "k", tmp_path / "kh",
                          1, tmp_path)  # fmt: skip
    argv = info.ssh_command("uptime")
    assert argv[0] == "ssh" and argv[-3:] == ["ubuntu@127.0.0.1", "--", "uptime"]
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in argv and "StrictHostKeyChecking=yes" in argv
    assert info.ssh_command()[-1] == "ubuntu@127.0.0.1"
    assert info.host_string == "ubuntu@127.0.0.1:2299"


HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup_hierarchies_hybrid_and_unified():
    own = "9:name=systemd:/a\n1:cpu:/\n0::/b/c\n"
    assert cgroup.hierarchies(HYBRID_MOUNTS, own) == [
        Path("/sys/fs/cgroup/systemd/a"),
        Path("/sys/fs/cgroup/unified/b/c"),
    ]
    v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cgroup.hierarchies(v2, "0::/user.slice\n") == [Path("/sys/fs/cgroup/user.slice")]


def test_cgroup_wrapper_joins_before_exec(tmp_path):
    procs = tmp_path / "g" / "cgroup.procs"
    procs.parent.mkdir()
    argv = cgroup.wrap([procs.parent], ["sh", "-c", "echo $$"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    assert procs.read_text().strip() == out  # same pid: the command replaced the shell
    assert cgroup.wrap([], ["x"]) == ["x"]


def test_remove_tree_refuses_nothing_when_unmounted(tmp_path):
    tree = tmp_path / "t" / "a"
    tree.mkdir(parents=True)
    assert rootfs.mounts_under(tmp_path) == []
    rootfs.remove_tree(tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_tasks_turn_errors_into_one_line_exits(monkeypatch):
    def boom(*args, **kwargs):
        raise sb.SandboxError("port 2222 on 127.0.0.1 is in use: pick another with --port")

    monkeypatch.setattr(sb, "up", boom)
    with pytest.raises(Exit) as caught:
        sandbox_tasks.up(Context(), name="demo")
    assert caught.value.code == 1 and "pick another" in str(caught.value.message)
    monkeypatch.setattr(sb, "load", lambda name: None)
    with pytest.raises(Exit, match="not running"):
        sandbox_tasks.ssh(Context(), name="demo")


def test_tasks_have_help_for_every_flag():
    for task in sandbox_tasks.ns.tasks.values():
        assert task.__doc__ and task.__doc__.strip().count("\n") == 0
        params = list(inspect.signature(task.body).parameters)[1:]  # after the context
        for param in params:
            assert param.rstrip("_") in task.help, (task.name, param)
    assert set(sandbox_tasks.ns.tasks) >= {"up", "down", "ssh", "status"}


def test_boot_failures_point_at_the_log(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    info = sb.SandboxInfo("demo", "127.0.0.1", port, "ubuntu", tmp_path / "k", tmp_path / "kh",
                          0, tmp_path)  # fmt: skip
    log = re.escape(str(tmp_path / "nspawn.log"))
    crashed = subprocess.Popen(["sh", "-c", "exit 1"])
    crashed.wait()
    with pytest.raises(sb.SandboxError, match=rf"exited \(code 1\) while booting demo; see {log}"):
        machine._wait_ready(info, crashed, time.monotonic() + 5)
    hung = subprocess.Popen(["sleep", "5"])
    try:
        with pytest.raises(sb.SandboxError, match=rf"timed out waiting for sshd; see {log}"):
            machine._wait_ready(info, hung, time.monotonic() + 0.3)
    finally:
        hung.kill()
        hung.wait()


def test_overlay_boot_command():
    argv = machine.nspawn_argv(Path("/c/base"), Path("/s/a:b/upper"), "demo")
    assert argv[1:3] == ["-D", "/c/base"]
    assert "--overlay=/c/base:/s/a\\:b/upper:/" in argv
    for flag in ("-b", "--register=no", "--keep-unit", "--console=passive"):
        assert flag in argv
    assert argv[argv.index("-M") + 1] == "demo"


def test_new_layer_dirs_copy_the_base(tmp_path):
    base, upper = tmp_path / "base", tmp_path / "upper"
    (base / "home/ubuntu/.ssh").mkdir(parents=True)
    (base / "home/ubuntu/.ssh").chmod(0o700)
    upper.mkdir()
    me = (os.getuid(), os.getgid())
    dest = instance.put(base, upper, "/home/ubuntu/.ssh/authorized_keys", "k\n", 0o600, me)
    assert dest.read_text() == "k\n" and dest.stat().st_mode & 0o777 == 0o600
    assert (upper / "home/ubuntu/.ssh").stat().st_mode & 0o777 == 0o700
    (base / "lib").symlink_to("usr/lib")
    with pytest.raises(sb.SandboxError, match="cannot shadow the symlink"):
        instance.make_parents(base, upper, "/lib/x/file")


def test_a_new_build_or_new_certificates_mean_a_new_base(tmp_path):
    tarball = tmp_path / "debian12-rootfs-abc.tar"
    tarball.write_bytes(b"")
    first = rootfs.base_path(tarball, {})
    assert first.name.startswith("debian12-base-abc-")
    assert rootfs.base_path(tarball, {"a.crt": b"pem"}) != first
    os.utime(tarball, ns=(1, 1))
    assert rootfs.base_path(tarball, {}) != first


def test_cgroup_pids_walk_sub_groups(tmp_path):
    group = tmp_path / "mlflow-stack-demo"
    (group / "payload/system.slice").mkdir(parents=True)
    (group / "cgroup.procs").write_text("")
    (group / "payload/cgroup.procs").write_text("12\n")
    (group / "payload/system.slice/cgroup.procs").write_text("13\n12\n")
    assert cgroup.pids([group]) == [12, 13]
    assert cgroup.pids([tmp_path / "missing"]) == []


def test_a_lock_unlinked_by_its_holder_is_not_shared(tmp_path):
    path = tmp_path / "locks" / "demo.lock"
    inside: list[str] = []
    with rootfs.locked(path):

        def second() -> None:
            with rootfs.locked(path):
                inside.append(f"second, file exists: {path.exists()}")  # not the unlinked one

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.2)
        assert inside == []  # blocked while the first holder runs
        path.unlink()
    waiter.join(5)
    assert inside == ["second, file exists: True"]
