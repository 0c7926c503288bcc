"""The wine data for tests: the shared copy when present, else a checksum-verified download."""

from __future__ import annotations

from pathlib import Path

from demo_wine.data import download
from mlflow_stack.vars import WINE_SHA256, WINE_URL

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "winequality-white.csv"


def wine_csv(directory: Path) -> Path:
    """The shared copy, or the UCI file downloaded into `directory` (refused unless its
    sha256 matches the pinned one)."""
    if SHARED_CSV.exists():
        return SHARED_CSV
    return download(WINE_URL, directory / "winequality-white.csv", WINE_SHA256)
