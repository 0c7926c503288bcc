"""Other Debian suites boot to `running` and reach the archive and PyPI (CA certificates)."""

from __future__ import annotations

import os
import uuid

import pytest

from mlflow_stack import sandbox as sb

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("distro", "version"), [("trixie", "13."), ("sid", "/sid")])
def test_suite_boots_running_with_apt_and_https(distro, version):
    info = sb.up(f"e2e-{uuid.uuid4().hex[:10]}", distro=distro)
    try:
        (info.state_dir / "e2e-owner").write_text(f"{os.getpid()}\n")
        client = sb.connect(info)
        try:

            def out(command: str, timeout: float = 60) -> str:
                result = sb.exec_command(client, command, timeout)
                assert result.rc == 0, (command, result)
                return result.stdout.strip()

            assert out("systemctl is-system-running --wait") == "running"
            assert version in out("cat /etc/debian_version")
            assert out("sudo -n apt-get update -qq && echo ok", timeout=180) == "ok"
            code = out("curl -sS --max-time 30 -o /dev/null -w '%{http_code}' "
                       "https://pypi.org/simple/pip/")  # fmt: skip
            assert code == "200"
        finally:
            client.close()
        assert sb.status(info.name)["distro"] == distro
    finally:
        sb.down(info.name)
