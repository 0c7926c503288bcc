"""The model server's fast path answers exactly as MLflow's scoring app: the same status, headers
and body for every request, whether the fast path scores it or hands it to MLflow's app."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("sklearn")

from mlflow_stack.actions.predict import SAMPLE_WINE
from mlflow_stack.hostside import fast_scoring

NAMES = list(SAMPLE_WINE)
JSON = "application/json"


def call(app, body: bytes, content_type: str | None = JSON, method="POST", path="/invocations"):
    """Drive an ASGI app in process: (status, headers, body) of its answer, or the type of the
    exception it raised (uvicorn answers 500 to that)."""
    headers = [(b"host", b"test")]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 5000),
    }
    # the body arrives in two chunks, as it may from uvicorn
    inbox = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.request", "body": body[len(body) // 2 :], "more_body": False},
    ]
    sent = []

    async def receive():
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)  # no disconnect while the app answers

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(app(scope, receive, send))
    except Exception as exc:
        return type(exc).__name__
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], sorted(start["headers"]), data


def save_model(directory, names=NAMES, types="double", signed=True):
    """An ElasticNet saved as MLflow does for the demo, with a signature of `names`."""
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import ElasticNet

    rng = np.random.default_rng(7)
    x = pd.DataFrame(rng.uniform(0, 50, (200, len(names))), columns=names)
    if types == "long":
        x = x.round().astype("int64")
    model = ElasticNet(alpha=0.1, l1_ratio=0.3).fit(x, x.sum(axis=1) * 0.01)
    signature = infer_signature(x.head(20), model.predict(x.head(20))) if signed else None
    mlflow.sklearn.save_model(
        model,
        str(directory),
        signature=signature,
        serialization_format="pickle",
        pip_requirements=["scikit-learn"],  # no requirement inference (slow, reads the repo)
    )
    return str(directory)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mlflow.pyfunc import scoring_server

    return scoring_server.load_model_with_mlflow_config(save_model(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def apps(model):
    """(MLflow's app, our app: the fast path in front of another instance of MLflow's app)."""
    from mlflow.pyfunc import scoring_server

    scorer = fast_scoring.FastScorer.for_model(model)
    assert scorer is not None
    ours = fast_scoring.FastPathApp(scoring_server.init(model), scorer)
    return scoring_server.init(model), ours


def split(rows, columns=NAMES, **extra):
    return {"dataframe_split": {"columns": columns, "data": rows, **extra}}


def sample_row(columns=NAMES):
    return [SAMPLE_WINE[c] for c in columns]


def random_rows(n, seed):
    rng = random.Random(seed)
    return [
        [rng.choice([rng.uniform(-1e3, 1e3), rng.randint(-100, 100), rng.random()]) for _ in NAMES]
        for _ in range(n)
    ]


REVERSED = NAMES[::-1]
# Requests the fast path scores itself.
FAST = {
    "split, the sample": split([sample_row()]),
    "split, columns in another order": split([sample_row(REVERSED)], REVERSED),
    "split, all integers": split([[int(v) for v in sample_row()]]),
    "split, 100 random rows": split(random_rows(100, 1)),
    "split, extreme values": split([[1e308, -1e-308, 0.0, -0.0, 2**53, -(2**53), *[1.5] * 5]]),
    "records, the sample": {"dataframe_records": [SAMPLE_WINE]},
    "records, three rows, keys shuffled": {
        "dataframe_records": [dict(zip(REVERSED, r[::-1], strict=True)) for r in random_rows(3, 2)]
    },
}
# Requests the fast path hands to MLflow's app (valid ones and errors alike).
DECLINED = {
    "split, 101 rows": split(random_rows(101, 3)),
    "split, an extra column": split([[*sample_row(), 1.0]], [*NAMES, "extra"]),
    "split, a missing column": split([sample_row()[1:]], NAMES[1:]),
    "split, a repeated column": split([[*sample_row()[1:], 1.0]], [*NAMES[1:], NAMES[1]]),
    "split, no columns": {"dataframe_split": {"data": [sample_row()]}},
    "split, with an index": split([sample_row()], index=[7]),
    "split, no rows": split([]),
    "split, a short row": split([sample_row()[1:]]),
    "split, a null": split([[None, *sample_row()[1:]]]),
    "split, a boolean": split([[True, *sample_row()[1:]]]),
    "split, a numeric string": split([["12.8", *sample_row()[1:]]]),
    "split, a word": split([["strong", *sample_row()[1:]]]),
    "split, a list value": split([[[1.0], *sample_row()[1:]]]),
    "split, a huge integer": split([[2**60, *sample_row()[1:]]]),
    "split, a row as a dict": split([SAMPLE_WINE]),
    "split, data not a list": split({"a": 1}),
    "split, a list": {"dataframe_split": [sample_row()]},
    "records, a missing key": {"dataframe_records": [{k: SAMPLE_WINE[k] for k in NAMES[1:]}]},
    "records, an extra key": {"dataframe_records": [{**SAMPLE_WINE, "extra": 1}]},
    "records, a null": {"dataframe_records": [{**SAMPLE_WINE, "pH": None}]},
    "records, a dict": {"dataframe_records": SAMPLE_WINE},
    "inputs": {"inputs": [SAMPLE_WINE]},
    "inputs, columns": {"inputs": {k: [v] for k, v in SAMPLE_WINE.items()}},
    "instances": {"instances": [SAMPLE_WINE]},
    "params": {**split([sample_row()]), "params": {"x": 1}},
    "two formats": {**split([sample_row()]), "dataframe_records": [SAMPLE_WINE]},
    "no format": {"data": [sample_row()]},
    "an LLM input": {"messages": [{"role": "user", "content": "hi"}]},
    "a JSON list": [SAMPLE_WINE],
    "a JSON number": 7,
}


def encode(payload) -> bytes:
    return json.dumps(payload).encode()


RAW_DECLINED = {
    "not JSON": b"{oops",
    "empty": b"",
    "not UTF-8": b'{"dataframe_split": "\xff"}',
    "NaN": encode(split([sample_row()])).replace(b"12.8", b"NaN"),
    "Infinity": encode(split([sample_row()])).replace(b"12.8", b"-Infinity"),
    "overflowing float": encode(split([sample_row()])).replace(b"12.8", b"1e400"),
    "nested too deep for json.loads": b'{"dataframe_split": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
}
RAW_FAST = {"UTF-16 (json.loads decodes it)": json.dumps(split([sample_row()])).encode("utf-16")}


@pytest.mark.parametrize("name", [*FAST, *RAW_FAST])
def test_fast_path_answers_as_mlflow(apps, model, name):
    body = RAW_FAST[name] if name in RAW_FAST else encode(FAST[name])
    assert fast_scoring.FastScorer.for_model(model).answer(body) is not None  # scored by us
    plain, ours = (call(app, body) for app in apps)
    assert plain[0] == 200
    assert ours == plain


@pytest.mark.parametrize("name", [*DECLINED, *RAW_DECLINED])
def test_declined_requests_get_mlflows_answer(apps, model, name):
    body = RAW_DECLINED[name] if name in RAW_DECLINED else encode(DECLINED[name])
    assert fast_scoring.FastScorer.for_model(model).answer(body) is None  # left to MLflow
    plain, ours = (call(app, body) for app in apps)
    assert ours == plain


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/csv", ",".join(NAMES) + "\n" + ",".join(map(str, sample_row())) + "\n"),
        ("text/csv", "a,b\n1,2\n"),
        ("application/json; charset=utf-8", json.dumps(split([sample_row()]))),
        ("application/json; charset=latin-1", json.dumps(split([sample_row()]))),
        ("application/json; format=pandas-split", json.dumps(split([sample_row()]))),
        ("Application/JSON", json.dumps(split([sample_row()]))),
        ("text/plain", json.dumps(split([sample_row()]))),
        (None, json.dumps(split([sample_row()]))),
    ],
)
def test_other_content_types_get_mlflows_answer(apps, content_type, body):
    plain, ours = (call(app, body.encode(), content_type) for app in apps)
    assert ours == plain


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ping"),
        ("GET", "/health"),
        ("GET", "/version"),
        ("GET", "/invocations"),
        ("POST", "/invocations/"),
        ("POST", "/nope"),
    ],
)
def test_other_routes_get_mlflows_answer(apps, method, path):
    plain, ours = (call(app, b"", None, method, path) for app in apps)
    assert ours == plain


def test_many_random_batches_score_identically(apps):
    """Bit-identical predictions for varied batches (values, sizes, integer columns)."""
    for seed in range(40):
        body = encode(split(random_rows(1 + seed * 2, 100 + seed)))
        plain, ours = (call(app, body) for app in apps)
        assert plain[0] == 200 and ours == plain


def test_only_plain_double_signatures_get_a_fast_path(tmp_path):
    from mlflow.pyfunc import scoring_server

    def scorer(directory, **kwargs):
        model = scoring_server.load_model_with_mlflow_config(save_model(directory, **kwargs))
        return fast_scoring.FastScorer.for_model(model)

    assert scorer(tmp_path / "double") is not None
    assert scorer(tmp_path / "long", types="long") is None
    assert scorer(tmp_path / "unsigned", signed=False) is None


def test_plain_number():
    ok = [0, -0.0, 1.5, 2**53, -(2**53), 1e308]
    bad = [True, None, "1", float("nan"), float("inf"), 2**53 + 1, [1.0], {"a": 1}]
    assert all(map(fast_scoring._plain_number, ok))
    assert not any(map(fast_scoring._plain_number, bad))


def test_the_model_gets_the_frame_mlflow_would_give_it(tmp_path):
    """Same columns, dtypes, index, values and memory layout as after MLflow's parsing and
    schema enforcement, so any model computes the same predictions from it."""
    import numpy as np
    import pandas as pd
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(save_model(tmp_path / "m"))
    frames = []
    real = model._predict_fn

    def recording(frame, params=None):
        frames.append(frame)
        return real(frame)

    model._predict_fn = recording
    scorer = fast_scoring.FastScorer.for_model(model)
    schema = model.metadata.get_input_schema()
    for name, payload in FAST.items():
        body = encode(payload)
        assert scoring_server.invocations(body, JSON, model, schema).status == 200
        assert scorer.answer(body) is not None
        theirs, ours = frames[-2:]
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True, obj=name)
        assert np.asarray(ours).strides == np.asarray(theirs).strides, name
