"""`invoke tunnel`: SSH port-forwards of the stack's web ports to the controller."""

from __future__ import annotations

import contextlib

from mlflow_stack.engine.forward import forward
from mlflow_stack.engine.host import Host


def forwards(ports: list[int], offset: int = 0) -> list[tuple[int, int]]:
    """(local, remote) pairs: the same numbers, shifted by `offset` locally."""
    return [(port + offset, port) for port in ports]


@contextlib.contextmanager
def tunnel(host: Host, pairs: list[tuple[int, int]]):
    """Forward each local port to 127.0.0.1:remote on the host while the context is open."""
    with contextlib.ExitStack() as stack:
        for local, remote in pairs:
            stack.enter_context(forward(host, local, remote))
        yield
