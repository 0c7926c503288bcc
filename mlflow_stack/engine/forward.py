"""Local port forwarding over a Paramiko connection to the host (like `ssh -L`).

The listening socket is bound before `forward()` returns, so a port in use fails at once with
a clear error and a client may connect immediately.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

import paramiko

from mlflow_stack.engine.host import Host, HostError


def _pump(client: socket.socket, channel: paramiko.Channel) -> None:
    with contextlib.suppress(OSError), client, channel:
        while True:
            ready, _, _ = select.select([client, channel], [], [], 1.0)
            if client in ready:
                data = client.recv(65536)
                if not data:
                    break
                channel.sendall(data)
            if channel in ready:
                data = channel.recv(65536)
                if not data:
                    break
                client.sendall(data)


def _serve(
    listener: socket.socket,
    transport: paramiko.Transport,
    remote: tuple[str, int],
    stop: threading.Event,
) -> None:
    while not stop.is_set():
        try:
            client, origin = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        try:
            channel = transport.open_channel("direct-tcpip", remote, origin, timeout=10)
        except (paramiko.SSHException, OSError):
            client.close()
            continue
        threading.Thread(target=_pump, args=(client, channel), daemon=True).start()


@contextlib.contextmanager
def forward(host: Host, local_port: int, remote_port: int, remote_host: str = "127.0.0.1"):
    """Forward 127.0.0.1:`local_port` to `remote_host`:`remote_port` as seen from the host."""
    transport = host.paramiko_transport()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", local_port))
    except OSError:
        listener.close()
        raise HostError(
            f"local port {local_port} is already in use; pick other local ports (--offset)"
        ) from None
    listener.listen(16)
    listener.settimeout(0.5)
    stop = threading.Event()
    thread = threading.Thread(
        target=_serve, args=(listener, transport, (remote_host, remote_port), stop), daemon=True
    )
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=2)
