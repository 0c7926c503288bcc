"""Streaming a command's data (`engine.streams`): no host, local processes stand in for ssh."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from mlflow_stack.engine import streams
from mlflow_stack.engine.host import Host, HostError, Target


def local(script: str, stdin: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_large_stdout_goes_to_the_sink_in_chunks_and_is_not_kept():
    size = 40 * 1024 * 1024
    script = (
        "import sys; b = bytes(range(256)) * 4096\n"
        f"for _ in range({size} // len(b)): sys.stdout.buffer.write(b)\n"
        "sys.stderr.write('done')"
    )
    digest, count, chunks = hashlib.sha256(), [0], [0]

    def sink(chunk: bytes) -> None:
        digest.update(chunk)
        count[0] += len(chunk)
        chunks[0] += 1

    out = streams.pump_process(local(script), None, sink, None)
    assert (out.rc, out.stdout, out.stderr) == (0, "", "done")
    assert count[0] == size and chunks[0] > 1
    assert digest.hexdigest() == hashlib.sha256(bytes(range(256)) * 4096 * 40).hexdigest()


def test_stdin_is_fed_from_the_chunks_of_a_file(tmp_path):
    data = bytes(range(256)) * 20_000
    path = tmp_path / "part"
    path.write_bytes(data)
    sent: list[int] = []
    script = (
        "import hashlib, sys; h = hashlib.sha256(sys.stdin.buffer.read()); "
        "print(h.hexdigest()); sys.exit(4)"
    )
    got: list[bytes] = []
    out = streams.pump_process(
        local(script, stdin=True), streams.file_chunks(path, sent.append), got.append, None
    )
    assert out.rc == 4
    assert b"".join(got).decode().strip() == hashlib.sha256(data).hexdigest()
    assert sum(sent) == len(data)


def test_a_failing_sink_kills_the_command_and_propagates():
    proc = local("import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)")

    def sink(chunk: bytes) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        streams.pump_process(proc, None, sink, None)
    assert proc.poll() is not None


def test_no_progress_in_either_direction_stops_the_command():
    out = streams.pump_process(local("import time; time.sleep(30)"), None, lambda c: None, 0.5)
    assert out.rc is None


def test_a_command_that_stops_reading_its_stdin_ends_cleanly(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"y" * (8 * 1024 * 1024))
    out = streams.pump_process(
        local("import sys; sys.stdin.buffer.read(10); sys.exit(2)", stdin=True),
        streams.file_chunks(path),
        lambda c: None,
        None,
    )
    assert out.rc == 2


def test_host_stream_reports_a_stalled_transfer():
    class Stalled:
        is_open = True

        def stream(self, command, source, sink, timeout):
            return streams.Output(None, "", "")

    host = Host(Target("web", "192.0.2.7"), _link=Stalled())
    with pytest.raises(HostError, match="no progress for 3 s"):
        host.stream("cat", sink=lambda c: None, timeout=3)


def test_host_run_reports_a_silent_command():
    class Silent:
        is_open = True

        def run(self, command, stdin, timeout, on_output):
            return streams.Output(None, "", "")

    host = Host(Target("web", "192.0.2.7"), _link=Silent())
    with pytest.raises(HostError, match="gave no output for 2 s and was stopped"):
        host.run("sleep 9", timeout=2)
    assert host.commands == 1
