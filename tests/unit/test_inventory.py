"""Inventory: loading, validation errors (file, key path, line), and --host resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_stack.inventory import (
    Inventory,
    InventoryError,
    parse_address,
    resolve,
)
from mlflow_stack.layout import ROLES as ALL_ROLES
from mlflow_stack.layout import WORKER_ROLES

GOOD = """
defaults:
  user: ubuntu
  key: ~/.ssh/demo.pem
  vars:
    mlflow: {workers: 2}
groups:
  server:
    hosts: [web]
  workers:
    hosts: [w1]
    vars:
      python: {manager: uv}
hosts:
  web:
    address: 10.0.0.5
    vars:
      mlflow: {public: true}
  w1:
    address: 10.0.0.6
    port: 2200
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def test_good_inventory_resolves_hosts_groups_and_vars(tmp_path):
    inv = Inventory.load(write(tmp_path, GOOD))
    (web,) = resolve("web", inv, ssh_config=tmp_path / "none")
    assert web.target.address == "10.0.0.5" and web.target.user == "ubuntu"
    assert web.vars.mlflow.workers == 2 and web.vars.mlflow.public is True
    assert web.roles == ALL_ROLES
    (w1,) = resolve("workers", inv, ssh_config=tmp_path / "none")
    assert w1.target.port == 2200 and w1.roles == WORKER_ROLES
    assert [h.name for h in resolve("web,w1", inv, ssh_config=tmp_path / "none")] == ["web", "w1"]


def test_a_host_named_like_its_group(tmp_path):
    """A group's members are inventory hosts: `server` in group `server` is that host (it
    once recursed without end, found by bench/bench_multihost.py)."""
    text = "groups:\n  server:\n    hosts: [server]\nhosts:\n  server:\n    address: 10.0.0.7\n"
    inv = Inventory.load(write(tmp_path, text))
    (server,) = resolve("server", inv, ssh_config=tmp_path / "none")
    assert server.name == "server" and server.target.address == "10.0.0.7"


def test_adhoc_address_gets_defaults_and_all_roles(tmp_path):
    inv = Inventory.load(write(tmp_path, GOOD))
    (h,) = resolve("admin@192.0.2.7:2022", inv, ssh_config=tmp_path / "none")
    assert (h.target.user, h.target.address, h.target.port) == ("admin", "192.0.2.7", 2022)
    assert h.roles == ALL_ROLES and h.vars.mlflow.workers == 2


def test_ssh_config_alias(tmp_path):
    inv = Inventory.load(write(tmp_path, GOOD))
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        "Host demo-box\n  HostName 192.0.2.9\n  User admin\n  Port 2223\n"
        "  IdentityFile ~/.ssh/box\n"
    )
    (h,) = resolve("demo-box", inv, ssh_config=cfg)
    assert (h.target.address, h.target.user, h.target.port) == ("192.0.2.9", "admin", 2223)
    assert h.target.key_file == Path("~/.ssh/box").expanduser()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts:\n  a:\n    adress: 1.2.3.4\n", "hosts.a.adress: unknown key (line 3)"),
        ("hosts:\n  a:\n    address: 1.2.3.4\n    port: ssh\n", "hosts.a.port: Input should be"),
        ("hosts:\n  a:\n    address: x\n    roles: [mysql, redis]\n", "hosts.a.roles.1"),
        ("hosts:\n  a:\n    address: x\n    port: 70000\n", "less than or equal to 65535"),
        ("hosts: [a\n", "YAML syntax error (line 2"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("groups:\n  server:\n    hosts: [ghost]\n", "groups.server.hosts: unknown host 'ghost'"),
        (
            "hosts:\n  a:\n    address: x\n    vars:\n      mlflow: {workers: lots}\n",
            "hosts.a.vars.mlflow.workers: Input should be a valid integer",
        ),
        (
            "defaults:\n  vars:\n    mlflow: {backend: postgres}\n",
            "defaults.vars.mlflow.backend: Input should be 'mysql' or 'sqlite'",
        ),
        (
            "hosts:\n  a:\n    address: x\n    vars:\n      mlfow: {}\n",
            "hosts.a.vars.mlfow: unknown key (line 5)",
        ),
    ],
)
def test_bad_inventory_names_file_key_and_problem(tmp_path, text, expected):
    with pytest.raises(InventoryError) as err:
        Inventory.load(write(tmp_path, text))
    message = str(err.value)
    assert message.startswith("inventory.yaml: ") and expected in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="inventory file not found"):
        Inventory.load(tmp_path / "nope.yaml")


def test_unknown_host_lists_what_exists(tmp_path, monkeypatch):
    from mlflow_stack import sandbox

    monkeypatch.setattr(sandbox, "load", lambda name: None)
    inv = Inventory.load(write(tmp_path, GOOD))
    with pytest.raises(InventoryError, match=r"unknown host 'nosuch'.*web, w1, server, workers"):
        resolve("nosuch", inv, ssh_config=tmp_path / "none")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1.2.3.4", (None, "1.2.3.4", None)),
        ("ubuntu@1.2.3.4:2222", ("ubuntu", "1.2.3.4", 2222)),
        ("root@host.example", ("root", "host.example", None)),
        ("[::1]:22", (None, "::1", 22)),
    ],
)
def test_parse_address(spec, expected):
    assert parse_address(spec) == expected


def test_parse_address_rejects_bad_port():
    with pytest.raises(InventoryError, match="out of range"):
        parse_address("a@b:99999")


def test_project_inventory_is_valid():
    inv = Inventory.load()
    assert "sandbox" in inv.model.hosts and "server" in inv.model.groups
