"""A cheaper path for the common /invocations request, in front of MLflow's scoring app.

Deployed next to model_server.py on the host. MLflow's handler builds a DataFrame from the JSON
and casts it to the signature column by column, then enforces the signature column by column
again: about two thirds of its CPU for a one-row request. For a request those steps would pass
unchanged — `Content-Type: application/json`, a body whose only key is `dataframe_split` or
`dataframe_records`, whose columns are exactly the signature's inputs (all required doubles),
with up to MAX_ROWS rows of finite numbers — `FastScorer` builds the DataFrame they would produce
in one step, calls the same model function, and encodes the answer with MLflow's own encoder.
Anything else (other formats, CSV, `params`, extra or missing columns, other values, errors,
models of other flavors or signatures) goes to MLflow's app untouched, so every answer is the
one MLflow gives, byte for byte (tests/unit/test_fast_scoring.py compares them).
"""

from __future__ import annotations

import inspect
import io
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Larger batches go to MLflow's handler, which scores in a thread instead of the event loop.
MAX_ROWS = 100
# Integers that convert to a double exactly, whichever way pandas or numpy converts them.
MAX_EXACT_INT = 2**53
JSON = b"application/json"


def _plain_number(value: Any) -> bool:
    """A JSON number MLflow casts to the same finite double as `float(value)` does."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -MAX_EXACT_INT <= value <= MAX_EXACT_INT


class FastScorer:
    """Scores eligible request bodies for one loaded pyfunc model (see the module docstring)."""

    def __init__(self, names: list[str], predict: Callable[[Any], Any]) -> None:
        self.names = names
        self._name_set = frozenset(names)
        self._predict = predict
        self._columns: Any = None  # the frames' column index, built once

    @classmethod
    def for_model(cls, model: Any) -> FastScorer | None:
        """A scorer for a scikit-learn pyfunc model whose signature is named required doubles
        and takes no params; None for any other model (MLflow's handler serves it alone)."""
        from mlflow.types import DataType

        meta = model.metadata
        schema = meta.get_input_schema()
        predict = getattr(model, "_predict_fn", None)
        if (
            model.loader_module != "mlflow.sklearn"
            or predict is None
            or schema is None
            or schema.is_tensor_spec()
            or not schema.has_input_names()
            or meta.get_params_schema() is not None
            or meta._is_signature_from_type_hint()
            or meta._is_type_hint_from_example()
        ):
            return None
        names = schema.input_names()
        if len(set(names)) != len(names) or not all(
            spec.type == DataType.double and spec.required for spec in schema.inputs
        ):
            return None
        if "params" in inspect.signature(predict).parameters:
            return cls(names, lambda frame: predict(frame, params=None))
        return cls(names, predict)

    def answer(self, body: bytes) -> bytes | None:
        """The JSON answer MLflow's handler would give for this body, or None to let it."""
        try:
            request = json.loads(body)
        except Exception:  # not JSON, not UTF-8/16/32, nested too deep: MLflow's handler answers
            return None
        if type(request) is not dict or len(request) != 1:
            return None
        ((key, value),) = request.items()
        if key == "dataframe_split":
            rows = self._split_rows(value)
        elif key == "dataframe_records":
            rows = self._record_rows(value)
        else:
            return None
        if rows is None:
            return None
        try:
            return self._score(rows)
        except Exception:  # MLflow's handler scores it again and reports the error its way
            return None

    def _split_rows(self, value: Any) -> list[list] | None:
        """Rows in signature order from `{"columns": [...], "data": [[...], ...]}`."""
        if type(value) is not dict or value.keys() != {"columns", "data"}:
            return None
        columns, data = value["columns"], value["data"]
        if (
            type(columns) is not list
            or len(columns) != len(self.names)
            or not all(type(c) is str for c in columns)
            or set(columns) != self._name_set
            or type(data) is not list
            or not 0 < len(data) <= MAX_ROWS
        ):
            return None
        width = len(columns)
        for row in data:
            if type(row) is not list or len(row) != width or not all(map(_plain_number, row)):
                return None
        if columns == self.names:
            return data
        order = [columns.index(name) for name in self.names]
        return [[row[i] for i in order] for row in data]

    def _record_rows(self, value: Any) -> list[list] | None:
        """Rows in signature order from `[{"column": value, ...}, ...]`."""
        if type(value) is not list or not 0 < len(value) <= MAX_ROWS:
            return None
        rows = []
        for record in value:
            if type(record) is not dict or record.keys() != self._name_set:
                return None
            row = [record[name] for name in self.names]
            if not all(map(_plain_number, row)):
                return None
            rows.append(row)
        return rows

    def _score(self, rows: list[list]) -> bytes:
        """Predict on the frame MLflow would pass the model (float64 columns in signature order,
        a RangeIndex) and encode the predictions as MLflow does."""
        import numpy as np
        import pandas as pd
        from mlflow.pyfunc.scoring_server import predictions_to_json

        if self._columns is None:
            self._columns = pd.Index(self.names)
        # one float64 block, column-major like the one MLflow's frame consolidates into (a
        # frame built from a dict of columns is 25x slower: it builds the column index anew)
        values = np.array(rows, dtype=np.float64, order="F")
        frame = pd.DataFrame(values, columns=self._columns, copy=False)
        out = io.StringIO()
        predictions_to_json(self._predict(frame), out)
        return out.getvalue().encode()


def _content_type(scope: Scope) -> bytes | None:
    """The first Content-Type header, as Starlette's `request.headers.get` reads it."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            return value
    return None


class FastPathApp:
    """ASGI app: POST /invocations with `Content-Type: application/json` goes to the scorer
    first; whatever it declines (and every other request) goes to MLflow's app, the body
    replayed."""

    def __init__(self, app: App, scorer: FastScorer) -> None:
        self.app = app
        self.scorer = scorer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != "/invocations"
            or _content_type(scope) != JSON
        ):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        answer = self.scorer.answer(body)
        if answer is None:
            await self.app(scope, _replay(body, receive), send)
            return
        headers = [(b"content-length", str(len(answer)).encode()), (b"content-type", JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that gives the already-read body once, then the connection's own."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
