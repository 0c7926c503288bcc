"""Instance size: memory sizes, memory cgroups of both hierarchies, OOM counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.sandbox import cgroup

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "9:name=systemd:/\n4:memory:/process_api/b37e\n0::/\n"
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1G", 2**30), ("1GiB", 2**30), ("256M", 256 * 2**20), ("512m", 2**29), ("1.5G", 3 * 2**29),
     ("2T", 2 * 2**40), (str(2**27), 2**27), (2**30, 2**30), ("65536K", 64 * 2**20)],
)  # fmt: skip
def test_sizes(text, value):
    assert cgroup.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "1X", "-1G", "G", "1 GB extra", "10M"])
def test_bad_sizes(bad):
    with pytest.raises(sb.SandboxError, match="memory size"):
        cgroup.parse_size(bad)


def test_format_size():
    assert [cgroup.format_size(v) for v in (2**30, 256 * 2**20, 3 * 2**29, 1000)] == [
        "1G", "256M", "1536M", "1000"]  # fmt: skip


def test_memory_parent_prefers_the_v1_controller():
    group = cgroup.memory_parent(V1_MOUNTS, V1_OWN)
    assert group == cgroup.MemoryGroup(Path("/sys/fs/cgroup/memory/process_api/b37e"), 1)
    v2 = cgroup.memory_parent(V2_MOUNTS, "0::/user.slice/session-1.scope\n")
    assert v2 == cgroup.MemoryGroup(Path("/sys/fs/cgroup/user.slice/session-1.scope"), 2)
    assert cgroup.memory_parent("", "") is None


def test_limit_files_per_hierarchy():
    v1 = cgroup.MemoryGroup(Path("/x"), 1).limit_files(2**30)
    assert v1 == [("memory.limit_in_bytes", "1073741824"),
                  ("memory.memsw.limit_in_bytes", "1073741824")]  # fmt: skip
    v2 = cgroup.MemoryGroup(Path("/x"), 2).limit_files(2**30)
    assert v2 == [("memory.max", "1073741824"), ("memory.swap.max", "0")]


def test_oom_counters_of_both_hierarchies(tmp_path):
    assert cgroup.parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3
    assert cgroup.parse_oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n") == 1
    assert cgroup.parse_oom_kills("oom_kill_disable 0\n") is None
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "memory.limit_in_bytes").write_text("268435456\n")
    (tmp_path / "memory.usage_in_bytes").write_text("1000\n")
    group = cgroup.memory_group({"path": str(tmp_path), "version": 1})
    assert (group.oom_kills(), group.limit(), group.usage()) == (2, 2**28, 1000)
    assert cgroup.MemoryGroup(tmp_path / "gone", 2).oom_kills() is None
    assert cgroup.memory_group(None) is None and cgroup.memory_group({}) is None
