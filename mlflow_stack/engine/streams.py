"""Streaming a remote command's data: stdin from an iterator of chunks, stdout to a sink.

`Host.run` keeps a command's whole output in memory, which is right for facts and results
and wrong for a backup's gigabytes. `Host.stream` runs a command the same way (same link,
same sudo) but hands every chunk of stdout to a `sink` callable as it arrives (nothing is
kept), and feeds stdin from `source`, an iterator of byte chunks (a file read piecewise, so
the caller can count progress). Stderr, small by nature, is kept for the error message.

A `timeout` stops the command after that many seconds without progress in either
direction. If the sink raises, the command is killed and the exception propagates.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mlflow_stack.engine.link import Output

if TYPE_CHECKING:
    import paramiko

CHUNK = 1 << 20
Sink = Callable[[bytes], None]
Source = Iterable[bytes]
F_SETPIPE_SZ = 1031  # Linux: a larger pipe means fewer, larger reads


def widen_pipe(fd: int, size: int = CHUNK) -> None:
    """Make a pipe's buffer `size` bytes if the system allows it (a hint, never an error)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)


class _Activity:
    """When data last moved, in either direction, and what the feeder ran into."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.feed_error: BaseException | None = None

    def touch(self) -> None:
        self.last = time.monotonic()


def pump_process(
    proc: subprocess.Popen, source: Source | None, sink: Sink, timeout: float | None
) -> Output:
    """Feed `source` to `proc`'s stdin, hand its stdout to `sink`, keep its stderr, wait.

    `proc` was started with stdout and stderr pipes, and a stdin pipe when `source` is given.
    Output.stdout is always empty (the sink had it); rc None: stopped for lack of progress."""
    activity = _Activity()
    errors: list[bytes] = []

    def drain_errors() -> None:
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
            errors.append(chunk)
            activity.touch()

    def feed() -> None:
        try:
            for chunk in source:
                proc.stdin.write(chunk)
                activity.touch()
        except BrokenPipeError:
            pass  # the command stopped reading: its exit status says why
        except BaseException as exc:  # a source that fails (unreadable file): reported
            activity.feed_error = exc
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    threads = [threading.Thread(target=drain_errors, daemon=True)]
    if source is not None:
        widen_pipe(proc.stdin.fileno())
        threads.append(threading.Thread(target=feed, daemon=True))
    for thread in threads:
        thread.start()
    fd = proc.stdout.fileno()
    widen_pipe(fd)
    silent = False
    try:
        while True:
            wait = None if not timeout else max(0.0, activity.last + timeout - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                if timeout and time.monotonic() - activity.last >= timeout:
                    silent = True
                    break
                continue
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            activity.touch()
            sink(chunk)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if silent:
            proc.kill()
    rc = proc.wait()
    for thread in threads:
        thread.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    if activity.feed_error is not None:
        raise activity.feed_error
    stderr = b"".join(errors).decode(errors="replace")
    return Output(None if silent else rc, "", stderr)


def pump_channel(
    channel: paramiko.Channel, source: Source | None, sink: Sink, timeout: float | None
) -> Output:
    """`pump_process` for a Paramiko channel on which the command was started."""
    activity = _Activity()
    errors: list[bytes] = []

    def drain_errors() -> None:
        for chunk in iter(lambda: channel.recv_stderr(65536), b""):
            errors.append(chunk)
            activity.touch()

    def feed() -> None:
        try:
            for chunk in source or ():
                channel.sendall(chunk)
                activity.touch()
        except OSError:
            pass
        except BaseException as exc:
            activity.feed_error = exc
        finally:
            with contextlib.suppress(OSError):
                channel.shutdown_write()

    threads = [
        threading.Thread(target=drain_errors, daemon=True),
        threading.Thread(target=feed, daemon=True),
    ]
    for thread in threads:
        thread.start()
    channel.settimeout(1.0)
    silent = False
    try:
        while True:
            try:
                chunk = channel.recv(CHUNK)
            except TimeoutError:
                if timeout and time.monotonic() - activity.last >= timeout:
                    silent = True
                    break
                continue
            if not chunk:
                break
            activity.touch()
            sink(chunk)
    finally:
        if silent:
            channel.close()
    rc = None if silent else channel.recv_exit_status()
    for thread in threads:
        thread.join(timeout=5)
    channel.close()
    if activity.feed_error is not None:
        raise activity.feed_error
    return Output(rc, "", b"".join(errors).decode(errors="replace"))


def file_chunks(path: str | os.PathLike, progress: Callable[[int], None] | None = None):
    """The bytes of a file in `CHUNK`-sized pieces, calling `progress(n)` after each."""
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
            if progress is not None:
                progress(len(chunk))
