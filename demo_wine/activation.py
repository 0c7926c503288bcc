"""Socket activation: the listening socket systemd hands a service (`LISTEN_FDS`), if any."""

from __future__ import annotations

import os
import socket

FIRST_FD = 3  # sd_listen_fds(3): passed sockets start at descriptor 3


def systemd_socket() -> socket.socket | None:
    """The one socket systemd passed to this process, or None when started otherwise."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for child processes
        os.environ.pop(name, None)
    sock = socket.socket(fileno=FIRST_FD)
    sock.set_inheritable(False)
    return sock
