"""Tuning across hosts on the private network: N trials on one server and two workers, beside
the same N on the server alone, in one run.

    python bench/bench_multihost.py [--n-trials 2000] [--keep]

Boots three private sandboxes (server, w1, w2), provisions them (the workers get `anaconda`
and `demo_files`), then times `invoke tune --n-trials N` on the server alone (one process,
its study in memory, trial runs through the recorder) and `invoke tune --n-trials N --group
workers` (one process per host, one study in the server's database over TLS; the workers
record their trial runs through MLflow's REST API on the server's private address). Prints
wall time and trials per second per host, and the tracking server's CPU per trial recorded
over REST (its processes' CPU time before and after, over the workers' trials; whole seconds,
so a rough figure). The three
sandboxes share this machine's cores, so the multi-host wall time is no speed-up figure: it is
the cost of the shared study and of REST recording.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stack import invoke
from mlflow_stack import sandbox as sb
from mlflow_stack.engine.host import Host, Target

NAMES = {"server": "bench-mh-server", "w1": "bench-mh-w1", "w2": "bench-mh-w2"}
OUTCOME = re.compile(r"study (\S+): (\d+) trials in ([\d.]+)s\s+\((.*)\)")


def inventory(directory: Path) -> Path:
    hosts = "".join(f"  {name}:\n    sandbox: {box}\n" for name, box in NAMES.items())
    path = directory / "inventory.yaml"
    path.write_text(
        f"groups:\n  server:\n    hosts: [server]\n  workers:\n    hosts: [w1, w2]\nhosts:\n{hosts}"
    )
    return path


def server_cpu_ns(info: sb.SandboxInfo) -> int:
    """CPU time the tracking server's unit has used so far."""
    h = Host(
        Target(
            "server", info.address, info.port, info.user, info.key_file, info.known_hosts,
            host_key_policy="strict",
        )
    )  # fmt: skip
    try:
        out = h.run(
            "pid=$(systemctl show -p MainPID --value mlflow-server.service); "
            "ps -o cputimes= -p $pid --ppid $pid | awk '{s += $1} END {print s}'",
            timeout=60,
        )
    finally:
        h.close()
    return int(out.stdout.strip()) * 10**9  # seconds of CPU (its processes and workers)


def tune(inv: Path, n: int, *extra: str) -> tuple[float, dict[str, int], str]:
    seconds, proc = invoke("tune", "--n-trials", str(n), "--quiet", "--inventory", str(inv), *extra)
    if proc.returncode != 0:
        sys.exit(f"invoke tune {' '.join(extra)} failed:\n{proc.stdout[-3000:]}{proc.stderr}")
    found = OUTCOME.search(proc.stdout)
    if not found:
        sys.exit(f"no outcome line in:\n{proc.stdout[-2000:]}")
    per_host = {k: int(v) for k, v in re.findall(r"([\w#.-]+): (\d+)", found[4])}
    return seconds, per_host, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="leave the sandboxes running")
    args = parser.parse_args()
    for box in NAMES.values():
        sb.down(box)
    infos = {name: sb.up(box) for name, box in NAMES.items()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = inventory(Path(tmp))
            seconds, proc = invoke("provision", "--host", "server,workers", "--inventory", str(inv))
            if proc.returncode != 0:
                sys.exit(f"provision failed:\n{proc.stdout[-3000:]}{proc.stderr}")
            print(f"cold provision of server + 2 workers: {seconds:.0f} s")
            n = args.n_trials
            alone, alone_hosts, _ = tune(inv, n)
            before = server_cpu_ns(infos["server"])
            spread, spread_hosts, out = tune(inv, n, "--group", "workers")
            rest_ns = server_cpu_ns(infos["server"]) - before
        print(f"\n{n} trials, wall time and trials/s per host (tuning only, `invoke` included)")
        print(f"  server alone       {alone:7.1f} s  " + per_second(alone_hosts, alone))
        print(f"  server + 2 workers {spread:7.1f} s  " + per_second(spread_hosts, spread))
        via = re.search(r"trial runs recorded via: (.*)", out)
        print(f"  recorded via: {via[1] if via else '?'}")
        remote = sum(v for k, v in spread_hosts.items() if not k.startswith("server"))
        if remote:
            print(
                f"tracking server CPU during the spread run: {rest_ns / 1e9:.1f} s, "
                f"{rest_ns / 1e6 / remote:.1f} ms per trial recorded over REST ({remote} trials)"
            )
    finally:
        if not args.keep:
            for box in NAMES.values():
                sb.down(box)
    return 0


def per_second(hosts: dict[str, int], seconds: float) -> str:
    return ", ".join(f"{k} {v} ({v / seconds:.1f}/s)" for k, v in hosts.items())


if __name__ == "__main__":
    sys.exit(main())
