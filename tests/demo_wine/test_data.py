"""Loading, validation and splitting of the wine CSV (real file, no MLflow)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo_wine import data
from demo_wine.errors import InputError

HEADER = ";".join(f'"{c}"' for c in data.COLUMNS)
ROW = "7;0.27;0.36;20.7;0.045;45;170;1.001;3;0.45;8.8;6"


def test_real_file_loads_and_matches_checksum(wine_csv: Path) -> None:
    df, digest = data.load_with_digest(str(wine_csv), expected_sha256=data.SHA256)
    assert digest == data.SHA256
    assert df.shape == (4898, 12)
    assert list(df.columns) == list(data.COLUMNS)
    assert all(str(t) == "float64" for t in df.dtypes)
    counts = df["quality"].astype(int).value_counts().to_dict()
    assert counts == {3: 20, 4: 163, 5: 1457, 6: 2198, 7: 880, 8: 175, 9: 5}


def test_split_is_reproducible_and_validation_stays_inside_train(wine_csv: Path) -> None:
    df = data.load_wine(str(wine_csv))
    a, b, c = data.split(df, seed=42), data.split(df, seed=42), data.split(df, seed=7)
    assert (len(a.y_train), len(a.y_test)) == (3673, 1225)
    assert list(a.x_test.index) == list(b.x_test.index)
    assert list(a.x_test.index) != list(c.x_test.index)
    assert a.params() == {"seed": "42", "test_size": "0.25", "n_train": "3673", "n_test": "1225"}
    inner = data.validation_split(a, 0.2)
    assert set(inner.x_train.index) | set(inner.x_test.index) == set(a.x_train.index)
    assert not set(inner.x_test.index) & set(a.x_test.index)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "data file is empty"),
        (b"  \n\n", "data file is empty"),
        (HEADER.encode() + b"\n", "header but no rows"),
        (
            HEADER.replace(';"alcohol"', "").encode() + b"\n" + b"1;" * 10 + b"6\n",
            "missing column(s) 'alcohol'",
        ),
        (b"a,b,c\n1,2,3\n", "(is it semicolon-separated?)"),
        (
            f"{HEADER}\n{ROW}\n{ROW.replace('0.045', 'abc')}\n".encode(),
            "non-numeric value 'abc' in column 'chlorides' at line 3",
        ),
        (f"{HEADER}\n{ROW.replace(';3;', ';;')}\n".encode(), "missing value in column 'pH'"),
        (f"{HEADER}\n{ROW.replace('8.8', '-8.8')}\n".encode(), "negative value -8.8"),
        (f"{HEADER}\n{ROW[:-1]}11\n".encode(), "must be a 0-10 score"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        data.load_wine(str(path))
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert str(path) in text


def test_missing_file_and_checksum_mismatch(tmp_path: Path, wine_csv: Path) -> None:
    with pytest.raises(InputError, match="data file not found"):
        data.load_wine(str(tmp_path / "nope.csv"))
    with pytest.raises(InputError, match="checksum mismatch"):
        data.load_wine(str(wine_csv), expected_sha256="0" * 64)


def test_default_path_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    expected = Path(data.__file__).resolve().parent / "data" / "winequality-white.csv"
    assert data.default_data_path() == str(expected)
    assert data.sha256_hex(expected.read_bytes()) == data.SHA256  # the shipped copy
    monkeypatch.setenv(data.DATA_ENV, "/srv/wine.csv")
    assert data.default_data_path() == "/srv/wine.csv"


@pytest.fixture
def http_dir(wine_csv: Path) -> Iterator[str]:
    """Serve the CSV's directory on 127.0.0.1 (random port)."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(wine_csv.parent)
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_loading_and_download(http_dir: str, wine_csv: Path, tmp_path: Path) -> None:
    url = f"{http_dir}/{wine_csv.name}"
    assert data.load_wine(url).equals(data.load_wine(str(wine_csv)))
    saved = data.download(url, tmp_path / "copy.csv")
    assert data.sha256_hex(saved.read_bytes()) == data.SHA256
    with pytest.raises(InputError, match="cannot download data from"):
        data.load_wine(f"{http_dir}/missing.csv")
    with pytest.raises(InputError, match="checksum mismatch"):
        data.download(url, tmp_path / "other.csv", "f" * 64)
    assert not (tmp_path / "other.csv").exists()
