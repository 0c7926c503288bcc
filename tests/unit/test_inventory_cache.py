"""The inventory cache: a second resolution of the same inventory skips YAML and pydantic."""

from __future__ import annotations

from pathlib import Path

import pytest
from invoke.exceptions import Exit

from mlflow_stack import cli, inventory_cache
from mlflow_stack.engine.host import Target
from mlflow_stack.host_vars import HostVars
from mlflow_stack.targets import ResolvedHost
from mlflow_stack.vars import StackVars, defaults, view

GOOD = """
defaults:
  user: ubuntu
  key: ~/.ssh/demo.pem
  vars:
    mlflow: {workers: 2}
groups:
  server:
    hosts: [web]
hosts:
  web:
    address: 10.0.0.5
    roles: [mysql, demo_files]
    vars:
      mlflow: {public: true}
      python:
        miniforge_sha256:
          x86_64: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
  box:
    sandbox: nosuch-sandbox
"""


@pytest.fixture
def inv(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "inventory.yaml"
    path.write_text(GOOD)
    return path


def no_loading(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the inventory was loaded again")

    monkeypatch.setattr(cli, "load_inventory", refuse)


def test_the_second_resolution_comes_from_the_cache_unchanged(inv, monkeypatch):
    first = cli.hosts_for(None, str(inv))
    no_loading(monkeypatch)
    second = cli.hosts_for(None, str(inv))
    assert [h.name for h in second] == ["web"]
    assert second[0].target == first[0].target
    assert second[0].target.key_file == Path("~/.ssh/demo.pem").expanduser()
    assert (second[0].roles, second[0].groups) == (("mysql", "demo_files"), ("server",))
    assert second[0].vars == first[0].vars
    assert second[0].vars.mlflow.workers == 2 and second[0].vars.mlflow.public is True
    assert second[0].vars.python.miniforge_sha256 == {"x86_64": "a" * 64}


def test_an_edited_inventory_is_read_again(inv):
    assert cli.hosts_for("web", str(inv))[0].vars.mlflow.workers == 2
    inv.write_text(GOOD.replace("workers: 2", "workers: 3"))
    assert cli.hosts_for("web", str(inv))[0].vars.mlflow.workers == 3


def test_a_bad_inventory_is_never_cached(inv):
    inv.write_text(GOOD.replace("workers: 2", "workers: many"))
    for _ in range(2):
        with pytest.raises(Exit, match="Input should be a valid integer"):
            cli.hosts_for("web", str(inv))


def test_only_inventory_hosts_and_groups_are_cached(inv, monkeypatch):
    cli.hosts_for("ubuntu@192.0.2.1:2200", str(inv))
    assert inventory_cache.lookup(inv, "ubuntu@192.0.2.1:2200") is None
    cli.hosts_for("server", str(inv))
    assert inventory_cache.lookup(inv, "server") is not None


def test_a_cached_sandbox_host_is_looked_up_live(inv):
    # as if the sandbox had been running when the entry was made
    box = ResolvedHost("box", Target("box", "127.0.0.1", 2222), ("mysql",), defaults())
    inventory_cache.store(inv, inv.read_bytes(), "box", "box", _inventory(inv), [box])
    assert inventory_cache.cache_dir().is_dir()
    with pytest.raises(Exit, match="sandbox 'nosuch-sandbox' is not running"):
        cli.hosts_for("box", str(inv))


def _inventory(path: Path):
    from mlflow_stack.inventory import Inventory

    return Inventory.load(path)


def test_entries_are_private(inv):
    cli.hosts_for("web", str(inv))
    (entry,) = inventory_cache.cache_dir().glob("*.json")
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    assert oct(entry.parent.stat().st_mode & 0o777) == "0o700"


def test_a_vars_view_reads_like_stack_vars_and_is_read_only():
    model = StackVars.model_validate({"mysql": {"allow_from": ["10.0.0.%"]}, "test": {"a": 1}})
    v = view(model)
    assert isinstance(v, HostVars)
    assert v.mysql.port == model.mysql.port and v.mysql.allow_from == ["10.0.0.%"]
    assert v.test == {"a": 1} and v.as_dict() == model.model_dump()
    v.mysql.allow_from.append("x")  # a copy: the view does not change
    assert v.mysql.allow_from == ["10.0.0.%"]
    with pytest.raises(AttributeError):
        v.mysql.nosuch  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        v.mysql.port = 1
