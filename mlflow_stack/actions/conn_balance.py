"""Connections spread evenly over the model server's forked workers.

Deployed next to model_server.py on the host. With one SO_REUSEPORT socket per worker the
kernel hashes each new connection onto a worker whatever its load: eight keep-alive connections
split 5/3, 6/2 or 4/4 over two workers (measured), and the busier worker's connections wait
longer.
Here the parent accepts on the one listening socket and passes the connections (SCM_RIGHTS over
a socket pair) to the workers in turn, so any run of N new connections is spread evenly. (Fewest
open connections first does worse: a worker learns that a client closed its old connections
only when its loop gets to it, and a client that reconnects at once finds stale counts: 6/2.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import selectors
import socket

import uvicorn


class Balancer:
    """The parent's side: accept, then hand the connections to the workers in turn."""

    def __init__(self, listener: socket.socket, workers: int) -> None:
        self.listener = listener
        pair = socket.AF_UNIX, socket.SOCK_SEQPACKET
        self.pairs = [socket.socketpair(*pair) for _ in range(workers)]
        self._turn = itertools.cycle(range(workers))
        self._selector: selectors.BaseSelector | None = None

    def worker_end(self, index: int) -> socket.socket:
        """In worker `index` after the fork: its channel (the other ends are closed, so a
        worker sees EOF on it when the parent is gone)."""
        self.listener.close()
        for number, (parent_end, child_end) in enumerate(self.pairs):
            parent_end.close()
            if number != index:
                child_end.close()
        channel = self.pairs[index][1]
        channel.setblocking(False)
        return channel

    def start(self) -> None:
        """In the parent after the forks: keep only its ends and watch the listener."""
        for _, child_end in self.pairs:
            child_end.close()
        self.listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)

    def pump(self, timeout: float) -> None:
        """Hand over the connections that arrive within `timeout` seconds."""
        assert self._selector is not None
        if not self._selector.select(timeout):
            return
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: try again on the next pump
                return
            with conn, contextlib.suppress(OSError):  # a dead worker: the parent stops anyway
                socket.send_fds(self.pairs[next(self._turn)][0], [b"c"], [conn.fileno()])

    def stop(self) -> None:
        """Stop accepting (new connections are refused) and close the channels."""
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self.listener.close()
        for parent_end, _ in self.pairs:
            parent_end.close()


class ChannelServer(uvicorn.Server):
    """A uvicorn server that serves the connections its channel brings instead of listening."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self._channel = channel
        self._tasks: set[asyncio.Task] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        asyncio.get_running_loop().add_reader(self._channel.fileno(), self._receive)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().remove_reader(self._channel.fileno())
        await super().shutdown(sockets=sockets)

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._channel, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            if not message and not fds:  # the parent is gone: stop like on SIGTERM
                loop.remove_reader(self._channel.fileno())
                self.should_exit = True
                return
            for fd in fds:
                task = loop.create_task(self._take(socket.socket(fileno=fd)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _take(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, sock)
        except OSError:
            sock.close()

    def _protocol(self) -> asyncio.Protocol:
        """uvicorn's HTTP protocol for one connection (what its own listener would create)."""
        return self.config.http_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
