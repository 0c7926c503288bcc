"""Memory and disk of the whole stack after `invoke demo`, on a sandbox of a given size.

    python bench/bench_memory.py                      # the default sandbox (no limits)
    python bench/bench_memory.py --cpus 1 --memory 1G # the original instance: small profile

Boots a fresh private sandbox, times its cold provisioning, runs `invoke demo` (50 trials)
while sampling the host's total PSS every 2 s, then prints each service's RSS and PSS (PSS:
pages shared by forked workers counted once), the total resident set once the services that
exit when idle have done so (the record service; on the small profile the warm runner too:
stopped here rather than waited for), the disk the envs and data use, and the OOM kills.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stack import invoke
from mlflow_stack import sandbox as sb
from mlflow_stack.engine.host import Host, Target

# Per unit: RSS and PSS in kB, from every process's smaps_rollup (as root on the host).
BY_UNIT = r"""
for p in /proc/[0-9]*; do
  u=$(sed -n 's#.*/\([^/]*\.service\).*#\1#p' $p/cgroup 2>/dev/null | head -1)
  awk -v u="${u:-other}" '/^Rss:/{r=$2} /^Pss:/{s=$2} END{if (r) print u, r, s}' \
    $p/smaps_rollup 2>/dev/null
done | awk '{r[$1]+=$2; s[$1]+=$3} END{for (u in r) print u, r[u], s[u]}'
"""
TOTAL_PSS = "cat /proc/[0-9]*/smaps_rollup 2>/dev/null | awk '/^Pss:/{s+=$2} END{print s}'"
# each path alone (du counts a file hard-linked into both envs once per command)
DISK = " ".join(
    f"du -sm {path} 2>/dev/null;"
    for path in ("/opt/anaconda/envs/mlflow", "/opt/anaconda/envs/demo", "/opt/anaconda",
                 "/var/lib/mysql", "/var/lib/mlflow", "/opt/demo")
)  # fmt: skip
IDLE_EXITS = {"small": ("mlflow-recorder.service", "demo-wine-warm.service"),
              "standard": ("mlflow-recorder.service",)}  # fmt: skip


def connect(info: sb.SandboxInfo) -> Host:
    return Host(Target("bench", info.address, info.port, info.user, info.key_file,
                       info.known_hosts))  # fmt: skip


def by_unit(h: Host) -> dict[str, tuple[int, int]]:
    rows = h.run(BY_UNIT).stdout.split()
    return {rows[i]: (int(rows[i + 1]), int(rows[i + 2])) for i in range(0, len(rows), 3)}


class PeakSampler(threading.Thread):
    """The largest total PSS seen on the host, sampled every `every` seconds."""

    def __init__(self, info: sb.SandboxInfo, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.info, self.every, self.peak, self.stop = info, every, 0, threading.Event()

    def run(self) -> None:
        h = connect(self.info)
        try:
            while not self.stop.wait(self.every):
                out = h.run(TOTAL_PSS).stdout.strip()
                if out.isdigit():
                    self.peak = max(self.peak, int(out))
        finally:
            h.close()


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int)
    parser.add_argument("--memory")
    parser.add_argument("--keep", action="store_true", help="leave the sandbox running")
    args = parser.parse_args()
    name = f"bench-mem-{args.cpus or 'n'}-{(args.memory or 'n').lower()}"
    sb.down(name)
    info = sb.up(name, cpus=args.cpus, memory=args.memory)
    try:
        started = time.perf_counter()
        _, proc = invoke("provision", "--host", name)
        cold = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"provision failed: {proc.stdout[-1500:]}{proc.stderr[-500:]}")
        sampler = PeakSampler(info)
        sampler.start()
        seconds, demo = invoke("demo", "--host", name, "--trials", "50")
        sampler.stop.set()
        sampler.join()
        if demo.returncode != 0:
            raise SystemExit(f"demo failed: {demo.stdout[-1500:]}{demo.stderr[-500:]}")
        h = connect(info)
        conf = h.run("cat /etc/mysql/*/60-mlflow-stack.cnf /etc/mysql/*/zz-mlflow-stack.cnf")
        profile = "small" if "# sizing: small" in conf.stdout else "standard"
        after = by_unit(h)
        for unit in IDLE_EXITS[profile]:
            h.run(f"systemctl stop {unit}")
        time.sleep(2)
        settled = by_unit(h)
        disk = h.run(DISK).stdout.split()
        h.close()
        print(f"sandbox: {args.cpus or 'all'} CPU, memory {args.memory or 'unlimited'}; "
              f"profile {profile}")  # fmt: skip
        print(f"cold provision: {cold:.0f} s; invoke demo (50 trials): {seconds:.0f} s")
        print(f"peak total PSS during the demo: {mb(sampler.peak)}")
        print(f"\n{'unit':34} {'RSS':>8} {'PSS':>8}   (after the demo)")
        for unit, (rss, pss) in sorted(after.items(), key=lambda kv: -kv[1][1]):
            if pss >= 5 * 1024 or unit.startswith(("mlflow", "demo", "jupyter", "maria", "mysql")):
                print(f"{unit:34} {mb(rss):>8} {mb(pss):>8}")
        total = sum(p for _, p in after.values())
        print(f"{'total (every process)':34} {'':>8} {mb(total):>8}")
        rest = sum(p for _, p in settled.values())
        gone = ", ".join(IDLE_EXITS[profile])
        print(f"{'total once idle (' + gone + ' exited)':34} {'':>8} {mb(rest):>8}")
        pairs = dict(zip(disk[1::2], disk[0::2], strict=False))
        print("\ndisk (MB): " + ", ".join(f"{path} {size}" for path, size in pairs.items()))
        print(f"OOM kills: {sb.oom_kills(name)}")
    finally:
        if not args.keep:
            sb.down(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
