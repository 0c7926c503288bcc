"""A bounded, cheap HTTP load generator: N POSTs at concurrency C over keep-alive connections.

One thread drives all C connections with non-blocking sockets and one pre-encoded request, so
the generator spends little CPU per request (it shares the machine's cores with the server it
measures). The C connections draw from one shared budget of N requests (closed loop: each sends
its next request when its answer is in), so a slow connection does not stretch the run's tail.
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import statistics
import time


class _Conn:
    __slots__ = ("buf", "need", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.sent_at = 0.0
        self.need = -1  # bytes of the whole answer once its header is in


def _answer_length(buf: bytes) -> int:
    """Bytes of the first answer in buf (header + Content-Length body), or -1 if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return -1
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return end + 4 + length


def load(
    port: int,
    body: dict,
    requests: int = 2000,
    concurrency: int = 8,
    path: str = "/invocations",
    warmup: int = 20,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> dict:
    """Send `requests` POSTs to host:`port` after `warmup` uncounted ones; throughput, latency
    percentiles, errors (non-200 answers) and the generator's own CPU seconds per request.
    `tls`: over HTTPS, keep-alive (one handshake per connection); `headers`: extra ones."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    if warmup:
        _run(host, port, request, warmup, concurrency, timeout, tls)
    cpu = time.process_time()
    started = time.perf_counter()
    latencies, errors = _run(host, port, request, requests, concurrency, timeout, tls)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    return {
        "requests": requests,
        "errors": errors,
        "rps": requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "loadgen_cpu_ms": cpu / requests * 1000,
    }


def _run(
    host: str,
    port: int,
    request: bytes,
    total: int,
    concurrency: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> tuple[list[float], int]:
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0
    issued = 0

    def send(conn: _Conn) -> None:
        nonlocal issued
        issued += 1
        conn.buf, conn.need = b"", -1
        conn.sent_at = time.perf_counter()
        conn.sock.sendall(request)  # small enough for an empty socket buffer

    def open_conn() -> _Conn:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        conn = _Conn(sock)
        sel.register(sock, selectors.EVENT_READ, conn)
        return conn

    for _ in range(min(concurrency, total)):
        send(open_conn())
    pending = min(concurrency, total)
    deadline = time.monotonic() + timeout
    while pending:
        events = sel.select(timeout=1.0)
        if not events and time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {host}:{port} in {timeout:.0f} s")
        for key, _ in events:
            conn: _Conn = key.data
            chunk = conn.sock.recv(65536)
            while chunk and tls is not None and conn.sock.pending():  # decrypted, not yet read
                chunk += conn.sock.recv(conn.sock.pending())
            if not chunk:  # the server closed the connection: count an error, reconnect
                sel.unregister(conn.sock)
                conn.sock.close()
                latencies.append(time.perf_counter() - conn.sent_at)
                errors += 1
                pending -= 1
                if issued < total:
                    send(open_conn())
                    pending += 1
                continue
            conn.buf += chunk
            if conn.need < 0:
                conn.need = _answer_length(conn.buf)
            if conn.need < 0 or len(conn.buf) < conn.need:
                continue
            latencies.append(time.perf_counter() - conn.sent_at)
            if conn.buf[9:12] != b"200":
                errors += 1
            deadline = time.monotonic() + timeout
            if issued < total:
                send(conn)
            else:
                pending -= 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return latencies, errors
