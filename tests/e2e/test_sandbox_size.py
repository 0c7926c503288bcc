"""Instance size, over real SSH: --cpus 1 --memory 256M like a small EC2 instance; a process
past the limit is OOM-killed and counted while the host survives; limits survive a reboot."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import paramiko
import pytest

from mlflow_stack import sandbox as sb

pytestmark = pytest.mark.e2e

LIMIT = 256 * 2**20
# What a process on the host can learn of its size: MemTotal unless a lower cgroup limit is
# visible (v2 memory.max at the cgroup namespace's root, or v1 memory.limit_in_bytes).
FACTS = r"""kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo); mem=$((kb * 1024))
for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
  lim=$(cat "$f" 2>/dev/null) || continue
  case $lim in ''|max) ;; *) [ "$lim" -lt "$mem" ] && mem=$lim ;; esac
done
echo "memory_bytes=$mem cpus=$(nproc)"
"""


@pytest.fixture(scope="module")
def small() -> Iterator[sb.SandboxInfo]:
    info = sb.up(f"e2e-{uuid.uuid4().hex[:10]}", cpus=1, memory="256M")
    (info.state_dir / "e2e-owner").write_text(f"{os.getpid()}\n")
    try:
        yield info
    finally:
        sb.down(info.name)


@pytest.fixture(scope="module")
def client(small) -> Iterator[paramiko.SSHClient]:
    conn = sb.connect(small)
    yield conn
    conn.close()


def run(client: paramiko.SSHClient, command: str, timeout: float = 60) -> sb.Result:
    return sb.exec_command(client, command, timeout)


def test_one_cpu_and_the_limit_visible_inside(small, client):
    assert run(client, "nproc").stdout.strip() == "1"
    assert run(client, FACTS).stdout.strip() == f"memory_bytes={LIMIT} cpus=1"
    facts = sb.status(small.name)
    assert (facts["cpus"], facts["memory"], facts["oom_kills"]) == (1, "256M", 0)


def test_a_process_past_the_limit_is_oom_killed_and_the_host_survives(small, client):
    before = sb.oom_kills(small.name)
    hog = run(client, "python3 -c 'b = bytearray(400 * 2**20); print(len(b))'; echo rc=$?", 120)
    assert hog.stdout.strip() == "rc=137", hog  # SIGKILL by the OOM killer, before any print
    assert sb.oom_kills(small.name) >= (before or 0) + 1
    assert run(client, "systemctl is-system-running").stdout.strip() == "running"
    assert sb.run(small, "echo alive").stdout.strip() == "alive"  # sshd took new logins


def test_limits_and_address_survive_a_reboot(small):
    again = sb.reboot(small.name)
    assert (again.address, again.port) == (small.address, 22)
    assert sb.run(again, "nproc").stdout.strip() == "1"
    facts = sb.status(small.name)
    assert (facts["cpus"], facts["memory"]) == (1, "256M")
    assert facts["oom_kills"] == 0  # a new memory cgroup for each boot: its counter starts at 0
