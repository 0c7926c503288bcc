"""`invoke tunnel`: SSH port-forwards of the stack's web ports to the controller."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from mlflow_stack.actions.remote import ActionError
from mlflow_stack.engine import forward
from mlflow_stack.engine.host import Host, HostError

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars


def forwards(ports: list[int], offset: int = 0) -> list[tuple[int, int]]:
    """(local, remote) pairs: the same numbers, shifted by `offset` locally."""
    return [(port + offset, port) for port in ports]


def port_pairs(
    host: Host, host_vars: HostVars, offset: int, database: bool
) -> list[tuple[int, int]]:
    """What to forward: MLflow, Jupyter, the served models (and the database)."""
    from mlflow_stack.actions.serve import served

    ports = [host_vars.mlflow.port, host_vars.jupyter.port, *sorted(served(host).values())]
    if database:
        ports.append(host_vars.mysql.port)
    pairs = forwards(ports, offset)
    too_high = [local for local, _ in pairs if local > 65535]
    if too_high:
        raise ActionError(f"--offset {offset}: local port {too_high[0]} is above 65535")
    return pairs


@contextlib.contextmanager
def tunnel(host: Host, pairs: list[tuple[int, int]]):
    """Forward each local port to 127.0.0.1:remote on the host while the context is open
    (over one SSH connection whose host key is checked like every other)."""
    with forward.forwards(host, pairs) as forwarding:
        yield forwarding


def wait_forever(forwarding: forward.Forwarding | None = None) -> None:
    """Block until interrupted (Ctrl-C raises KeyboardInterrupt) or the forwards end."""
    while True:
        time.sleep(0.5)
        if forwarding is not None and (why := forwarding.ended()):
            raise HostError(why)
