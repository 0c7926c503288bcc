"""`invoke demo` as a user runs it, on the session's provisioned sandbox, twice."""

from __future__ import annotations

import math
import re

import pytest

from tests.e2e.helpers import host, invoke, secret_forms, sh

pytestmark = pytest.mark.e2e


def run_demo(stack):
    proc = invoke(
        "demo",
        "--host",
        "e2e",
        "--trials",
        "20",
        "--port",
        "54410",
        "--inventory",
        str(stack.inv),
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


def summary(out: str) -> dict[str, str]:
    block = out.split("== summary", 1)[1].split("Open the UIs:", 1)[0]
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block.strip().splitlines()]
    return {row[0]: row[1] for row in rows if len(row) == 2}


def test_demo_walkthrough_and_a_safe_rerun(stack):
    out = run_demo(stack)
    for step in (
        "provision",
        "train alpha=0.42",
        "train alpha=0.1",
        "tune 20 trials",
        "serve the champion",
        "predict the sample wine",
        "check-mysql",
    ):
        assert f"== {step}" in out
    table = summary(out)
    assert len(table["training runs"].split(", ")) == 2
    assert 0.5 < float(table["best RMSE (single runs)"]) < 0.9
    assert re.match(r"models:/wine-elasticnet@champion = version \d+", table["champion"])
    assert table["served"] == "http://127.0.0.1:54410/invocations"
    assert math.isfinite(float(table["prediction (sample wine)"]))
    assert table["check-mysql"] == "passed"
    assert "token=" not in out  # the login is shown by `invoke urls --reveal`, not here
    h = host(stack.info)
    try:
        for name in ("db_password", "jupyter_token"):
            secret = sh(h, f"cat /etc/mlflow-stack/secrets/{name}").strip()
            for form in secret_forms(secret):  # plain, URL-encoded, JSON-escaped
                assert form not in out, name
    finally:
        h.close()
    assert "curl -s http://127.0.0.1:54410/invocations" in out
    assert "`invoke tunnel` forwards them" in out

    again = summary(run_demo(stack))
    assert again["provisioning changes"] == "0"
    assert again["check-mysql"] == "passed"
