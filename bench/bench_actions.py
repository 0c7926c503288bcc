"""Remote actions on a provisioned sandbox: `invoke train` end to end, `invoke serve` cold
start until /ping, and serving throughput (one-row requests, concurrency 8) of our unit next to
plain `mlflow models serve -m …` with its defaults, in the same run.

    .venv/bin/python bench/bench_actions.py [--runs 3] [--requests 2000] [--keep]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from loadgen import load
from stack import NAME, PORTS, SLOT, SSH_PORT, invoke, median_range, provision
from stack import inventory as make_inventory

from mlflow_stack import sandbox
from mlflow_stack.actions.predict import SAMPLE_WINE, dataframe_split

OUR_PORT, PLAIN_PORT = 25501 + 10 * SLOT, 25502 + 10 * SLOT


def must(result) -> str:
    _, proc = result
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip()[-800:])
    return proc.stdout


def plain_serve(info, model_uri: str, port: int) -> None:
    """`mlflow models serve` with its defaults, as the demo user, in a transient unit."""
    env = (
        f"--setenv=MLFLOW_TRACKING_URI=http://127.0.0.1:{PORTS['mlflow']} "
        "--setenv=PATH=/opt/anaconda/envs/demo/bin:/usr/bin:/bin --setenv=HOME=/opt/demo"
    )
    cmd = (
        f"sudo systemd-run --unit=bench-plain-serve --uid=demo --gid=demo {env} "
        f"/opt/anaconda/envs/demo/bin/mlflow models serve -m {model_uri} -p {port} "
        "--env-manager local"
    )
    sandbox.run(
        info,
        "sudo systemctl stop bench-plain-serve 2>/dev/null; "
        "sudo systemctl reset-failed bench-plain-serve 2>/dev/null; " + cmd,
    )
    deadline = time.monotonic() + 120
    while sandbox.run(info, f"curl -sf http://127.0.0.1:{port}/ping").rc != 0:
        if time.monotonic() > deadline:
            raise SystemExit("plain mlflow models serve did not answer /ping")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    name = NAME
    info = sandbox.load(name) or sandbox.up(name, SSH_PORT)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = str(make_inventory(Path(tmp), name))
            provision(Path(inv))
            walls, run_id = [], ""
            for _ in range(args.runs):
                started = time.perf_counter()
                out = must(invoke("train", "--alpha", "0.42", "--quiet", "--inventory", inv))
                walls.append(time.perf_counter() - started)
                run_id = re.search(r"^run ([0-9a-f]{32})", out, re.M).group(1)
            print(f"invoke train, end to end: {median_range(walls)}  (goal <= 5 s)")
            colds = []
            for _ in range(args.runs):
                must(invoke("serve", "--stop", "--name", "bench", "--inventory", inv))
                started = time.perf_counter()
                out = must(
                    invoke(
                        "serve",
                        "--run",
                        run_id,
                        "--name",
                        "bench",
                        "--port",
                        str(OUR_PORT),
                        "--inventory",
                        inv,
                    )
                )
                colds.append(time.perf_counter() - started)
            model_uri = re.search(r"^model: (\S+)", out, re.M).group(1)
            print(f"invoke serve, cold until /ping: {median_range(colds)}  (goal <= 10 s)")
            body = dataframe_split([SAMPLE_WINE])
            ours = load(OUR_PORT, body, args.requests)
            plain_serve(info, model_uri, PLAIN_PORT)
            plain = load(PLAIN_PORT, body, args.requests)
            for label, r in (("ours (unit, 1 worker)", ours), ("plain mlflow models serve", plain)):
                print(
                    f"serving {label:<26} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                    f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}"
                )
            print(
                f"throughput ratio ours/plain: {ours['rps'] / plain['rps']:.2f}x  "
                "(goal >= 2x with p99 <= 50 ms)"
            )
            sandbox.run(info, "sudo systemctl stop bench-plain-serve")
    finally:
        if not args.keep:
            sandbox.down(name)


if __name__ == "__main__":
    main()
