"""`invoke status`'s data lines: sizes and free disk parsed from recorded outputs, the warning."""

from __future__ import annotations

import pytest

from mlflow_stack.actions import storage
from mlflow_stack.engine import facts as F


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500 MiB", 500 * 2**20), ("1.5G", 15 * 10**8), ("4096", 4096)],
)
def test_sizes(text, size):
    assert storage.parse_size(text) == size


def test_a_disk_below_the_threshold_is_warned_about():
    values = {
        "databases": F.ShellResult(0, "mlflow\t531000000\noptuna\t2100000\n"),
        "artifacts": F.ShellResult(0, "1070000000\n"),
        "workspace": F.ShellResult(1, ""),  # not there yet
        "disk": F.ShellResult(0, "1200000000 8000000000 /\n1200000000 8000000000 /\n"),
    }
    usage = storage.parse(values, storage.parse_size("2GB"))
    assert usage.sizes == {
        "database mlflow": 531000000,
        "database optuna": 2100000,
        "artifacts": 1070000000,
    }
    lines = storage.render(usage)
    assert lines[0] == "  data: database mlflow 531.0 MB, database optuna 2.1 MB, artifacts 1.1 GB"
    assert lines[1] == "  disk: 1.2 GB free of 8.0 GB on /"  # one filesystem, listed once
    assert lines[2].startswith("  WARNING: 1.2 GB free on /, below 2.0 GB (disk.warn_free_below)")
    roomy = storage.parse({"disk": F.ShellResult(0, "9000000000 10000000000 /\n")}, 2 * 10**9)
    assert not any("WARNING" in line for line in storage.render(roomy))


def test_the_sqlite_backend_is_sized_as_a_file():
    facts = storage.size_facts("sqlite")
    assert "database mlflow" in facts and "databases" not in facts
    assert (
        "du -s -B1 --apparent-size /var/lib/mlflow/mlflow.db" in facts["database mlflow"].command()
    )
