"""A bounded HTTP load generator: N POSTs at concurrency C over keep-alive connections."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time


def load(
    port: int, body: dict, requests: int = 2000, concurrency: int = 8, path: str = "/invocations"
) -> dict:
    """Send `requests` POSTs to 127.0.0.1:`port`; throughput and latency percentiles."""
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_thread = [
        requests // concurrency + (1 if i < requests % concurrency else 0)
        for i in range(concurrency)
    ]

    def worker(count: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(count):
            started = time.perf_counter()
            try:
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.perf_counter() - started)
            if not ok:
                with lock:
                    errors += 1
        with lock:
            latencies.extend(mine)
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in per_thread]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": requests,
        "errors": errors,
        "rps": requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }
