"""Remote actions on a provisioned sandbox: `invoke train` end to end, `invoke serve` cold
start until /ping, and serving throughput (one-row requests, concurrency 8) of our unit next to
plain `mlflow models serve -m …` with its defaults, in the same run.

    .venv/bin/python bench/bench_actions.py [--runs 3] [--requests 2000] [--keep]

With --proxy: the host public (MLflow behind the HTTPS proxy), the model served with
`invoke serve --public`, and the same load through the proxy (HTTPS, keep-alive, TLS verified
against the host's CA, bearer token) and directly on the model's port, alternating.

    .venv/bin/python bench/bench_actions.py --proxy [--runs 5] [--requests 3000]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from loadgen import load
from stack import NAME, PORTS, PROXY_PORTS, SLOT, SSH_PORT, invoke, median_range, provision
from stack import inventory as make_inventory

from mlflow_stack import sandbox
from mlflow_stack.actions.predict import SAMPLE_WINE, dataframe_split

OUR_PORT, PLAIN_PORT = 25501 + 10 * SLOT, 25502 + 10 * SLOT


def must(result) -> str:
    _, proc = result
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip()[-800:])
    return proc.stdout


def plain_serve(info, model_uri: str, port: int) -> float:
    """`mlflow models serve` with its defaults, as the demo user, in a transient unit; the
    seconds from its start until /ping answers (polled over SSH every 0.5 s)."""
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
        "sudo systemctl reset-failed bench-plain-serve 2>/dev/null",
    )
    started = time.perf_counter()
    sandbox.run(info, cmd)
    deadline = time.monotonic() + 120
    while sandbox.run(info, f"curl -sf http://127.0.0.1:{port}/ping").rc != 0:
        if time.monotonic() > deadline:
            raise SystemExit("plain mlflow models serve did not answer /ping")
        time.sleep(0.5)
    return time.perf_counter() - started


def unit_cpu(info, unit: str) -> float:
    """CPU seconds used so far by a unit's main process and its children (from /proc)."""
    script = (
        f"m=$(systemctl show -p MainPID --value {unit}); t=0; "
        'for p in $m $(pgrep -P "$m"); do set -- $(cut -d")" -f2 /proc/$p/stat); '
        "t=$((t + ${12} + ${13})); done; echo $t $(getconf CLK_TCK)"
    )
    ticks, hz = sandbox.run(info, script).stdout.split()
    return int(ticks) / int(hz)


def train_runs(inv: str, runs: int) -> tuple[list[float], str]:
    """Wall seconds of `invoke train` runs, and the last run's id."""
    walls, run_id = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        out = must(invoke("train", "--alpha", "0.42", "--quiet", "--inventory", inv))
        walls.append(time.perf_counter() - started)
        run_id = re.search(r"^run ([0-9a-f]{32})", out, re.M).group(1)
    return walls, run_id


def median(values) -> float:
    return statistics.median(list(values))


def summary(label: str, rs: list[dict]) -> str:
    rps = [r["rps"] for r in rs]
    return (
        f"serving {label:<34} {median(rps):7.1f} req/s ({min(rps):.0f}-{max(rps):.0f})  "
        f"p50 {median(r['p50_ms'] for r in rs):6.1f} ms  "
        f"p99 {median(r['p99_ms'] for r in rs):6.1f} ms  "
        f"loadgen CPU {median(r['loadgen_cpu_ms'] for r in rs):4.2f} ms/req  "
        f"errors {sum(r['errors'] for r in rs)}"
    )


def proxy_bench(info, inv: str, args) -> None:
    """The same load directly on the model's port and through the HTTPS proxy, alternating."""
    import ssl

    _, run_id = train_runs(inv, 1)
    must(invoke("serve", "--stop", "--name", "bench", "--inventory", inv))
    must(
        invoke("serve", "--run", run_id, "--name", "bench", "--port", str(OUR_PORT), "--public",
               *(["--workers", str(args.workers)] if args.workers else []), "--inventory", inv)
    )  # fmt: skip
    token = sandbox.run(info, "sudo cat /etc/mlflow-stack/secrets/model_bench_token").stdout
    pin = sandbox.run(info, "sudo cat /etc/mlflow-proxy/ca/root.crt").stdout
    tls = ssl.create_default_context(cadata=pin)  # the host's CA: TLS verified, as a client
    body = dataframe_split([SAMPLE_WINE])
    results: dict[str, list[dict]] = {"direct": [], "proxy": []}
    model, proxy = "mlflow-model@bench", "mlflow-proxy"

    def measured(run) -> dict:
        """`run()`'s figures, with the model server's and the proxy's CPU per request."""
        before = unit_cpu(info, model), unit_cpu(info, proxy)
        r = run()
        r["server_cpu_ms"] = (unit_cpu(info, model) - before[0]) / args.requests * 1e3
        r["proxy_cpu_ms"] = (unit_cpu(info, proxy) - before[1]) / args.requests * 1e3
        return r

    for _ in range(args.runs):
        results["direct"].append(measured(lambda: load(OUR_PORT, body, args.requests)))
        results["proxy"].append(
            measured(
                lambda: load(
                    PROXY_PORTS["https"],
                    body,
                    args.requests,
                    path="/models/bench/invocations",
                    tls=tls,
                    headers={"Authorization": f"Bearer {token.strip()}"},
                )
            )
        )
    for label, key in (("direct (http, model port)", "direct"),
                       ("through the proxy (https, bearer)", "proxy")):  # fmt: skip
        rs = results[key]
        print(
            summary(label, rs) + f"  model CPU {median(r['server_cpu_ms'] for r in rs):.2f} "
            f"ms/req  proxy CPU {median(r['proxy_cpu_ms'] for r in rs):.2f} ms/req"
        )
    ratios = [p["rps"] / d["rps"] for d, p in zip(results["direct"], results["proxy"], strict=True)]
    print(
        f"throughput ratio proxy/direct: {median(ratios):.2f}x "
        f"(per round {', '.join(f'{x:.2f}' for x in ratios)})  "
        "(goal >= 0.8x with p99 <= 50 ms through the proxy)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--workers", type=int, help="`invoke serve --workers` (default: its own)")
    parser.add_argument("--serve-only", action="store_true", help="train once, untimed")
    parser.add_argument("--proxy", action="store_true", help="direct vs through the HTTPS proxy")
    args = parser.parse_args()
    name = NAME
    info = sandbox.load(name) or sandbox.up(name, SSH_PORT, network="host")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = str(make_inventory(Path(tmp), name, public=args.proxy))
            provision(Path(inv))
            if args.proxy:
                proxy_bench(info, inv, args)
                return
            walls, run_id = train_runs(inv, 1 if args.serve_only else args.runs)
            if not args.serve_only:
                print(f"invoke train, end to end: {median_range(walls)}  (goal <= 5 s)")
                # Reference, same run: the same command with the warm runner stopped.
                sandbox.run(info, "sudo systemctl stop demo-wine-warm")
                try:
                    colds, _ = train_runs(inv, args.runs)
                finally:
                    sandbox.run(info, "sudo systemctl start demo-wine-warm")
                print(f"reference: invoke train, warm runner stopped: {median_range(colds)}")
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
                        *(["--workers", str(args.workers)] if args.workers else []),
                        "--inventory",
                        inv,
                    )
                )
                colds.append(time.perf_counter() - started)
            model_uri = re.search(r"^model: (\S+)", out, re.M).group(1)
            print(f"invoke serve, cold until /ping: {median_range(colds)}  (goal <= 10 s)")
            body = dataframe_split([SAMPLE_WINE])
            seconds = plain_serve(info, model_uri, PLAIN_PORT)
            print(f"reference: plain mlflow models serve, start until /ping: {seconds:.2f} s")
            units = {"ours": "mlflow-model@bench", "plain": "bench-plain-serve"}
            ports = {"ours": OUR_PORT, "plain": PLAIN_PORT}
            results: dict[str, list[dict]] = {"ours": [], "plain": []}
            # Alternate the two servers, round after round, so that the machine's other load
            # falls on both alike; the same load generator drives both.
            for _ in range(args.runs):
                for who in ("ours", "plain"):
                    cpu = unit_cpu(info, units[who])
                    r = load(ports[who], body, args.requests)
                    r["server_cpu_ms"] = (unit_cpu(info, units[who]) - cpu) / args.requests * 1e3
                    results[who].append(r)
            label = {
                "ours": f"ours (unit, {args.workers or 'default'} workers)",
                "plain": "plain mlflow models serve",
            }
            for who, rs in results.items():
                rps = [r["rps"] for r in rs]
                print(
                    f"serving {label[who]:<28} {median(rps):7.1f} req/s "
                    f"({min(rps):.0f}-{max(rps):.0f})  "
                    f"p50 {median(r['p50_ms'] for r in rs):6.1f} ms  "
                    f"p99 {median(r['p99_ms'] for r in rs):6.1f} ms  "
                    f"server CPU {median(r['server_cpu_ms'] for r in rs):5.2f} ms/req  "
                    f"loadgen CPU {median(r['loadgen_cpu_ms'] for r in rs):4.2f} ms/req  "
                    f"errors {sum(r['errors'] for r in rs)}"
                )
            ratios = [
                o["rps"] / p["rps"] for o, p in zip(results["ours"], results["plain"], strict=True)
            ]
            print(
                f"throughput ratio ours/plain: {median(ratios):.2f}x "
                f"(per round {', '.join(f'{x:.2f}' for x in ratios)})  "
                "(goal >= 2x with p99 <= 50 ms)"
            )
            sandbox.run(info, "sudo systemctl stop bench-plain-serve")
    finally:
        if not args.keep:
            sandbox.down(name)


if __name__ == "__main__":
    main()
