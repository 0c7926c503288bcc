"""Load, validate and split the UCI white-wine-quality data (semicolon-separated CSV)."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo_wine.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

FEATURES = (
    "fixed acidity",
    "volatile acidity",
    "citric acid",
    "residual sugar",
    "chlorides",
    "free sulfur dioxide",
    "total sulfur dioxide",
    "density",
    "pH",
    "sulphates",
    "alcohol",
)
TARGET = "quality"
COLUMNS = (*FEATURES, TARGET)
UCI_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/wine-quality/winequality-white.csv"
)
SHA256 = "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836"
DATA_ENV = "DEMO_WINE_DATA"
DEFAULT_SEED = 42
DEFAULT_TEST_SIZE = 0.25
DEFAULT_VAL_SIZE = 0.2


BUNDLED = Path(__file__).resolve().parent / "data" / "winequality-white.csv"


def default_data_path() -> str:
    """``$DEMO_WINE_DATA`` if set, else the copy shipped in the package (``data/``)."""
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return env
    return str(BUNDLED)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_bytes(source: str, timeout: float = 30.0) -> bytes:
    """Read a local path or an http(s) URL; raise :class:`InputError` when unreadable."""
    if is_url(source):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"cannot download data from {source}: {reason}") from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"data file not found: {source} (pass --data or set {DATA_ENV})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read data file {source}: {exc.strerror}") from None


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def verify_sha256(raw: bytes, expected: str = SHA256, source: str = "data") -> None:
    """Raise :class:`InputError` unless ``raw`` hashes to ``expected``."""
    actual = sha256_hex(raw)
    if actual != expected.lower():
        raise InputError(f"checksum mismatch for {source}: sha256 {actual}, expected {expected}")


def download(url: str, dest: str | Path, expected_sha256: str = SHA256) -> Path:
    """Download ``url`` to ``dest`` atomically after verifying its sha256."""
    raw = read_bytes(url)
    verify_sha256(raw, expected_sha256, url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(raw)
    tmp.replace(dest)
    return dest


def parse(raw: bytes, source: str = "data") -> pd.DataFrame:
    """Parse and validate CSV bytes into a float DataFrame with exactly :data:`COLUMNS`."""
    import pandas as pd

    if not raw.strip():
        raise InputError(f"data file is empty: {source}")
    try:
        df = pd.read_csv(io.BytesIO(raw), sep=";")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot parse {source} as semicolon-separated CSV: {first}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        hint = " (is it semicolon-separated?)" if len(df.columns) == 1 else ""
        names = ", ".join(repr(c) for c in missing)
        raise InputError(f"missing column(s) {names} in {source}{hint}")
    if df.empty:
        raise InputError(f"data has a header but no rows: {source}")
    return _to_numeric(df.loc[:, list(COLUMNS)], source)


def _to_numeric(df: pd.DataFrame, source: str) -> pd.DataFrame:
    import pandas as pd

    out = {}
    for col in COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~values.abs().lt(float("inf"))
        if bad.any():
            pos = int(bad.to_numpy().argmax())
            raw = df[col].iloc[pos]
            line = pos + 2  # 1-based, after the header line
            what = "missing value" if pd.isna(raw) else f"non-numeric value {str(raw)!r}"
            raise InputError(f"{what} in column {col!r} at line {line} of {source}")
        negative = values.lt(0)
        if negative.any():
            pos = int(negative.to_numpy().argmax())
            raise InputError(
                f"negative value {values.iloc[pos]:g} in column {col!r} at line {pos + 2} "
                f"of {source}"
            )
        out[col] = values.astype("float64")
    if out[TARGET].gt(10).any():
        raise InputError(f"column {TARGET!r} must be a 0-10 score in {source}")
    return pd.DataFrame(out, index=df.index)


def load_wine(source: str | None = None, expected_sha256: str | None = None) -> pd.DataFrame:
    """Load and validate the wine data from a path or URL (default: :func:`default_data_path`)."""
    frame, _ = load_with_digest(source, expected_sha256)
    return frame


def load_with_digest(
    source: str | None = None, expected_sha256: str | None = None
) -> tuple[pd.DataFrame, str]:
    """Like :func:`load_wine` but also return the sha256 of the raw file."""
    source = source or default_data_path()
    raw = read_bytes(source)
    if expected_sha256:
        verify_sha256(raw, expected_sha256, source)
    return parse(raw, source), sha256_hex(raw)


@dataclass(frozen=True)
class Split:
    """A reproducible train/test split of features ``X`` and target ``y``."""

    x_train: Any
    x_test: Any
    y_train: Any
    y_test: Any
    seed: int
    test_size: float

    def params(self) -> dict[str, str]:
        return {
            "seed": str(self.seed),
            "test_size": str(self.test_size),
            "n_train": str(len(self.y_train)),
            "n_test": str(len(self.y_test)),
        }


def split(
    df: pd.DataFrame, seed: int = DEFAULT_SEED, test_size: float = DEFAULT_TEST_SIZE
) -> Split:
    """Split into train/test with a fixed seed (stratification is not used)."""
    from sklearn.model_selection import train_test_split

    x = df.loc[:, list(FEATURES)]
    y = df[TARGET]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed
    )
    return Split(x_train, x_test, y_train, y_test, seed, test_size)


def validation_split(data: Split, val_size: float = DEFAULT_VAL_SIZE) -> Split:
    """Carve a validation split out of ``data``'s training part (the test part is untouched)."""
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(
        data.x_train, data.y_train, test_size=val_size, random_state=data.seed
    )
    return Split(x_fit, x_val, y_fit, y_val, data.seed, val_size)
