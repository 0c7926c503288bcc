"""Bad input on the command line and in the inventory: one clear line, exit ≠ 0, nothing run.

These cases fail before any host is touched (the ones that need a host are in
tests/e2e/test_actions_e2e.py::test_bad_input_is_one_clear_line and the tests after it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD = "hosts:\n  web:\n    address: 127.0.0.1\n    port: 1\n"


def run(tmp_path: Path, inventory_text: str | None, *args: str):
    cmd = [sys.executable, "-m", "invoke", *args]
    if inventory_text is not None:
        inv = tmp_path / "inventory.yaml"
        inv.write_text(inventory_text)
        cmd += ["--inventory", str(inv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


CASES = [
    ("invalid YAML", "hosts: [web\n", ["provision"], "inventory.yaml: YAML syntax error (line 2"),
    (
        "wrong type",
        "hosts:\n  web:\n    address: x\n    port: ssh\n",
        ["provision"],
        "inventory.yaml: hosts.web.port: Input should be a valid integer",
    ),
    (
        "unknown key",
        "hosts:\n  web:\n    adress: x\n",
        ["provision"],
        "inventory.yaml: hosts.web.adress: unknown key (line 3)",
    ),
    (
        "unknown role in inventory",
        "hosts:\n  web:\n    address: x\n    roles: [nginx]\n",
        ["provision"],
        "hosts.web.roles.0: unknown role 'nginx'; roles: anaconda, mysql",
    ),
    ("unknown host", GOOD, ["provision", "--host", "nosuch"], "unknown host 'nosuch'"),
    (
        "unknown role flag",
        GOOD,
        ["provision", "--host", "web", "--roles", "redis"],
        "--roles: unknown role 'redis'",
    ),
    (
        "unreachable host",
        GOOD,
        ["provision", "--host", "web"],
        "web: cannot reach ubuntu@127.0.0.1:1",
    ),
    ("alpha not a number", GOOD, ["train", "--alpha", "abc"], "--alpha 'abc': not a number"),
    ("alpha negative", GOOD, ["train", "--alpha", "-0.5"], "--alpha -0.5: must be >= 0"),
    (
        "l1 ratio above 1",
        GOOD,
        ["train", "--l1-ratio", "1.2"],
        "--l1-ratio 1.2: must be between 0 and 1",
    ),
    ("no trials", GOOD, ["tune", "--n-trials", "0"], "--n-trials 0: must be 1 to"),
    (
        "payload file missing",
        GOOD,
        ["predict", "--data", "/nonexistent.json"],
        "--data /nonexistent.json: No such file or directory",
    ),
    ("serve without a model", GOOD, ["serve"], "give exactly one of --run RUN_ID or --model"),
    (
        "serve port out of range",
        GOOD,
        ["serve", "--run", "0" * 32, "--port", "80"],
        "--port 80: must be 1024 to 65535",
    ),
]


@pytest.mark.parametrize(("what", "inventory", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, what, inventory, args, message):
    proc = run(tmp_path, inventory, *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # no traceback
    assert message in lines[0]


def test_unknown_task_flag(tmp_path):
    proc = run(tmp_path, None, "provision", "--bogus")
    assert proc.returncode != 0 and "No idea what '--bogus' is!" in proc.stderr
