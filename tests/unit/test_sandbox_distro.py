"""Sandbox distributions: per-suite recipe, cache names, pruning, nspawn environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.sandbox import base, distro, rootfs


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(base.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(base.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.delenv(distro.DISTRO_ENV, raising=False)


def test_three_suites_bookworm_by_default(monkeypatch):
    assert list(distro.DISTROS) == ["bookworm", "trixie", "sid"]
    assert distro.get().suite == "bookworm"
    monkeypatch.setenv(distro.DISTRO_ENV, "trixie")
    assert distro.get().suite == "trixie"
    with pytest.raises(sb.SandboxError, match="choose one of bookworm, trixie, sid"):
        distro.get("jessie")


def test_only_sid_needs_the_unified_hierarchy_and_the_stale_release_conf():
    assert distro.get("sid").nspawn_env() == {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    assert distro.get("bookworm").nspawn_env() == distro.get("trixie").nspawn_env() == {}
    conf = rootfs.recipe_files("sid")[distro.APT_CONF]
    assert 'Acquire::Check-Valid-Until "false";' in conf.splitlines()
    assert distro.APT_CONF not in rootfs.recipe_files("bookworm")
    assert distro.APT_CONF not in rootfs.recipe_files("trixie")


def test_cache_key_and_names_include_the_suite(tmp_path):
    keys = {name: rootfs.cache_key(name) for name in distro.DISTROS}
    assert len(set(keys.values())) == 3
    assert rootfs.cache_key() == keys["bookworm"]
    assert rootfs.tarball_path("sid") == tmp_path / "cache" / f"debian-sid-rootfs-{keys['sid']}.tar"
    assert sb.tarball_path() == rootfs.tarball_path("bookworm")
    argv = rootfs.debootstrap_argv(Path("/x/root"), "trixie")
    assert argv[-3:] == ["trixie", "/x/root", "http://deb.debian.org/debian"]


def test_pruning_stays_within_one_distribution(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(rootfs, "lower_dirs_in_use", lambda: set())
    names = ["debian-bookworm-base-a-1", "debian-bookworm-base-b-2", "debian-sid-base-c-3",
             "debian12-base-old-4"]  # fmt: skip
    for name in names:
        (cache / name).mkdir()
    rootfs.prune_bases({cache / "debian-bookworm-base-b-2"}, "bookworm")
    left = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert left == ["debian-bookworm-base-b-2", "debian-sid-base-c-3", "debian12-base-old-4"]


def test_a_base_under_a_running_nspawn_is_never_pruned(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "debian-trixie-base-a-1").mkdir(parents=True)
    monkeypatch.setattr(rootfs, "lower_dirs_in_use", lambda: {cache / "debian-trixie-base-a-1"})
    rootfs.prune_bases(set(), "trixie")
    assert (cache / "debian-trixie-base-a-1").is_dir()


def test_lower_dirs_in_use_reads_nspawn_command_lines():
    found = rootfs.lower_dirs_in_use()  # whatever runs here: only absolute paths
    assert all(p.is_absolute() for p in found)
    assert os.getpid() > 0
