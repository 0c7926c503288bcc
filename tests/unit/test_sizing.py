"""The sizing profile: chosen from the host's recorded size facts, overridable."""

from __future__ import annotations

import subprocess

import pytest

from mlflow_stack.engine import facts as F
from mlflow_stack.sizing import Sizing


@pytest.mark.parametrize(
    ("printed", "memory", "cpus"),
    [
        ("memory_bytes=25276071936 cpus=2", 25276071936, 2),  # this machine, a sandbox
        ("memory_bytes=268435456 cpus=1", 268435456, 1),  # a --cpus 1 --memory 256M sandbox
        ("memory_bytes=1011683328 cpus=1\n", 1011683328, 1),  # a t2.micro's MemTotal
    ],
)
def test_size_fact_parses_what_the_host_prints(printed, memory, cpus):
    assert F.Size().parse(printed, 0) == F.HostSize(memory, cpus)


def test_size_fact_runs_here():
    out = subprocess.run(["sh", "-c", F.Size().command()], capture_output=True, text=True)
    size = F.Size().parse(out.stdout, out.returncode)
    assert size.memory_bytes > 2**26 and size.cpus >= 1


def test_a_garbled_size_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unexpected host size 'memory_bytes=x'"):
        F.Size().parse("memory_bytes=x", 0)


@pytest.mark.parametrize(
    ("memory_gib", "cpus", "choice", "profile"),
    [
        (0.94, 1, "auto", "small"),  # t2.micro: 1 GiB less the kernel's share
        (1.0, 1, "auto", "small"),
        (1.99, 2, "auto", "small"),
        (2.0, 1, "auto", "standard"),
        (23.5, 2, "auto", "standard"),
        (0.94, 1, "standard", "standard"),  # overridden both ways
        (23.5, 2, "small", "small"),
    ],
)
def test_profile_from_memory_unless_set(memory_gib, cpus, choice, profile):
    size = F.HostSize(int(memory_gib * 2**30), cpus)
    assert Sizing.of(size, choice).profile == profile


def test_what_each_profile_runs():
    small = Sizing.of(F.HostSize(2**30, 1))
    big = Sizing.of(F.HostSize(32 * 2**30, 16))
    assert small.tracking_workers(None) == 1 and big.tracking_workers(None) == 4
    assert Sizing.of(F.HostSize(8 * 2**30, 2)).tracking_workers(None) == 1
    assert small.tracking_workers(3) == 3  # as set
    assert small.warm_runner(None) == "on-demand" and big.warm_runner(None) == "always"
    assert small.warm_runner(True) == "always" and big.warm_runner(False) == "off"
    assert small.malloc_arenas == 2 and big.malloc_arenas is None
    assert small.describe() == "small (1 CPU, 1.0 GiB)"
