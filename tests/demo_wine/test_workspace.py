"""Shipped notebooks reach a workspace without ever overwriting the user's edits."""

from __future__ import annotations

from pathlib import Path

from demo_wine.workspace import seed


def shipped(tmp_path: Path, version: str) -> Path:
    d = tmp_path / f"shipped-{version}"
    d.mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb"):
        (d / name).write_text(f'{{"cells": [], "v": "{name} {version}"}}')
    return d


def test_copied_once_updated_when_untouched_kept_when_edited(tmp_path):
    ws = tmp_path / "ws"
    v1, v2 = shipped(tmp_path, "1"), shipped(tmp_path, "2")
    assert seed(ws, v1) == [
        f"{ws}/notebooks/01_a.ipynb: copied",
        f"{ws}/notebooks/02_b.ipynb: copied",
    ]
    assert seed(ws, v1) == []  # nothing to do the second time
    (ws / "notebooks" / "02_b.ipynb").write_text("my edits")
    (ws / "notebooks" / "mine.ipynb").write_text("my own notebook")
    done = seed(ws, v2)
    assert (ws / "notebooks" / "01_a.ipynb").read_text() == (v2 / "01_a.ipynb").read_text()
    assert (ws / "notebooks" / "02_b.ipynb").read_text() == "my edits"
    assert (ws / "notebooks" / "02_b.new.ipynb").read_text() == (v2 / "02_b.ipynb").read_text()
    assert (ws / "notebooks" / "mine.ipynb").read_text() == "my own notebook"
    assert any("yours is kept" in line for line in done)


def test_a_deleted_notebook_comes_back_and_a_symlink_is_left_alone(tmp_path):
    ws = tmp_path / "ws"
    v1 = shipped(tmp_path, "1")
    seed(ws, v1)
    (ws / "notebooks" / "01_a.ipynb").unlink()
    (ws / "notebooks" / "02_b.ipynb").unlink()
    (ws / "notebooks" / "02_b.ipynb").symlink_to("/etc/hostname")
    done = seed(ws, v1)
    assert (ws / "notebooks" / "01_a.ipynb").exists()
    assert (ws / "notebooks" / "02_b.ipynb").is_symlink() and "not a file" in done[-1]
