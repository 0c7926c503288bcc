"""The wine data for tests: the shared copy when present, else a checksum-verified download."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from mlflow_stack.vars import WINE_SHA256, WINE_URL

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "winequality-white.csv"


def download_wine_csv(directory: Path) -> Path:
    """Download the UCI file into `directory`, refusing it unless its sha256 matches."""
    data = urllib.request.urlopen(WINE_URL, timeout=60).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WINE_SHA256:
        raise RuntimeError(f"{WINE_URL}: sha256 {digest}, expected {WINE_SHA256}")
    path = directory / "winequality-white.csv"
    path.write_bytes(data)
    return path


def wine_csv(directory: Path) -> Path:
    return SHARED_CSV if SHARED_CSV.exists() else download_wine_csv(directory)
